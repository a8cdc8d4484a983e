"""Discovering plugins through the ``mtrun`` entry-point group and building the registry.

Environment:
    MTRUN_LOAD_PLUGINS: comma-separated entry-point names; only these (and core's ``builtins``)
        are loaded. Set it empty to load core alone.
    MTRUN_DISABLE_PLUGINS: comma-separated entry-point names that are not loaded.
    MTRUN_TRACE: set to 1 to print, on standard error, each entry point found and why it was
        skipped, where each plugin was imported from and how long it took, and each component
        it registered (kind, name, class): what to read when an install misbehaves.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import time
from importlib import metadata
from typing import Any, Iterable

import attrs
import pluggy

from mtrun import hookspecs
from mtrun.errors import PluginError
from mtrun.registry import PluginInfo, Registry

__all__ = ["BrokenPlugin", "LoadedPlugin", "PluginSet", "check_api_version", "get_plugins", "load_plugins"]

ENTRY_POINT_GROUP = "mtrun"
BUILTINS = "builtins"


@attrs.frozen
class LoadedPlugin:
    info: PluginInfo
    module: Any


@attrs.frozen
class BrokenPlugin:
    """A plugin left out by a lenient load (:func:`load_plugins` with ``strict=False``)."""

    info: PluginInfo
    error: PluginError


@attrs.frozen
class PluginSet:
    """The loaded plugins and the registry they filled; ``broken`` only from a lenient load."""

    plugins: tuple[LoadedPlugin, ...]
    registry: Registry
    broken: tuple[BrokenPlugin, ...] = ()

    def components_of(self, plugin_name: str) -> list[tuple[str, str]]:
        return [(c.kind, c.name) for c in self.registry if c.plugin.name == plugin_name]


def _trace(message: str) -> None:
    """One ``MTRUN_TRACE`` line on standard error (nothing unless MTRUN_TRACE is set)."""
    if os.environ.get("MTRUN_TRACE", "") not in ("", "0"):
        print(f"mtrun trace: {message}", file=sys.stderr, flush=True)


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _selected_entry_points() -> list[metadata.EntryPoint]:
    only = _env_names("MTRUN_LOAD_PLUGINS")
    disabled = _env_names("MTRUN_DISABLE_PLUGINS") or set()
    chosen: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled:
            _trace(f"entry point {ep.name} = {ep.value!r} ({_dist_name(ep)}): skipped, named in MTRUN_DISABLE_PLUGINS")
            continue
        if only is not None and ep.name != BUILTINS and ep.name not in only:
            _trace(f"entry point {ep.name} = {ep.value!r} ({_dist_name(ep)}): skipped, not named in MTRUN_LOAD_PLUGINS")
            continue
        if ep.name in chosen and chosen[ep.name].value != ep.value:
            first, second = chosen[ep.name], ep
            raise PluginError(
                f"two distributions declare the mtrun entry point {ep.name!r}: "
                f"{_dist_name(first)} ({first.value}) and {_dist_name(second)} ({second.value})"
            )
        chosen[ep.name] = ep
    # A name asked to load that is not installed is always worth a line; one asked to disable
    # only when it looks like a typo of an installed one (job scripts disable what may be absent).
    installed = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for var, names in (("MTRUN_LOAD_PLUGINS", only or set()), ("MTRUN_DISABLE_PLUGINS", disabled)):
        for name in sorted(names - installed):
            close = difflib.get_close_matches(name, sorted(installed), n=1)
            if close or var == "MTRUN_LOAD_PLUGINS":
                print(f"mtrun: {var} names {name!r}, which is not an installed plugin"
                      + (f" (did you mean {close[0]!r}?)" if close else "") + f"; installed: {', '.join(sorted(installed))}",
                      file=sys.stderr)
    return sorted(chosen.values(), key=lambda ep: (ep.name != BUILTINS, ep.name))


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


def _info(ep: metadata.EntryPoint) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    return PluginInfo(
        name=ep.name,
        distribution=dist.name if dist is not None else None,
        version=dist.version if dist is not None else None,
    )


def load_plugins(extra: Iterable[tuple[PluginInfo, Any]] = (), *, entry_points: bool = True, strict: bool = True) -> PluginSet:
    """Import every selected plugin, check its hooks and let it register its components.

    Args:
        extra: In-process plugins (``(info, module_or_object)``) registered after the entry
            points; tests use this with ``entry_points=False`` for an isolated registry.
        entry_points: Whether to discover plugins through the ``mtrun`` entry-point group.
        strict: Raise at the first broken plugin (what training and validation need: a recipe
            must never silently lose a component). ``False`` leaves broken plugins out and
            lists them in :attr:`PluginSet.broken`, so ``mtrun plugins`` can show the rest.

    Raises:
        PluginError: With ``strict``, a plugin failed to import, declares an unknown ``mtrun_``
            hook, or registered a component that breaks the registry's rules.
    """
    broken: list[BrokenPlugin] = []

    def fail(info: PluginInfo, error: PluginError) -> None:
        if strict:
            raise error
        broken.append(BrokenPlugin(info, error))

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    candidates: list[tuple[PluginInfo, Any]] = []
    if entry_points:
        for ep in _selected_entry_points():
            info = _info(ep)
            started = time.perf_counter()
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's
                _trace(f"{info.describe()}: import of {ep.value!r} failed: {type(exc).__name__}: {exc}")
                error = PluginError(
                    f'Error importing plugin "{ep.name}" (entry point {ep.name} = {ep.value!r} '
                    f"in distribution {info.distribution or '<unknown>'} {info.version or ''}): "
                    f"{type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
                fail(info, error)
                continue
            where = getattr(module, "__file__", None) or "<no file>"
            _trace(f"{info.describe()}: imported {ep.value!r} from {where} in {1000 * (time.perf_counter() - started):.0f} ms")
            candidates.append((info, module))
    candidates.extend(extra)

    registered: dict[str, LoadedPlugin] = {}
    for info, module in candidates:
        try:
            check_api_version(info, module)
            pm.register(module, name=info.name)
            _check_marked(pm, info, module)
        except PluginError as error:
            fail(info, error)
            continue
        except ValueError as exc:
            fail(info, PluginError(f"{info.describe()} could not be registered: {exc}"))
            continue
        registered[info.name] = LoadedPlugin(info, module)
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            culprit = next((p for p in registered.values() if p.module is exc.plugin), None)
            hooks = sorted(name for name in dir(exc.plugin) if name.startswith("mtrun_") and name != "mtrun_register_components")
            who = culprit.info.describe() if culprit is not None else repr(exc.plugin)
            error = PluginError(
                f"{who} defines {', '.join(hooks) or 'a hook'} marked @mtrun.hookimpl, which is no mtrun hook: the one hook is "
                "mtrun_register_components(registry) (a misspelling?); fix it, or skip the plugin with "
                f"MTRUN_DISABLE_PLUGINS={culprit.info.name if culprit is not None else 'NAME'}"
            )
            if strict or culprit is None:
                raise error from exc
            pm.unregister(culprit.module)
            del registered[culprit.info.name]
            fail(culprit.info, error)

    registry = Registry()
    # Calling each implementation directly lets the registry know who is registering.
    for impl in reversed(pm.hook.mtrun_register_components.get_hookimpls()):
        info = registered[impl.plugin_name].info
        registry.current_plugin = info
        try:
            impl.function(registry=registry)
            for component in registry:
                if component.plugin.name == info.name:
                    cls = component.cls
                    _trace(f"{info.describe()} registered {component.kind} {component.name!r} -> {cls.__module__}.{cls.__qualname__}")
        except Exception as exc:  # noqa: BLE001
            _trace(f"{info.describe()}: its mtrun_register_components hook raised {type(exc).__name__}: {exc}")
            error = exc if isinstance(exc, PluginError) else PluginError(
                f"{info.describe()} failed while registering its components: {type(exc).__name__}: {exc}"
            )
            if strict:
                raise error from (None if error is exc else exc)
            registry.remove_plugin(info.name)  # nothing half-registered stays
            del registered[info.name]
            broken.append(BrokenPlugin(info, error))
    registry.current_plugin = PluginInfo(name="<direct>")
    return PluginSet(tuple(registered.values()), registry, tuple(broken))


def _check_marked(pm: pluggy.PluginManager, info: PluginInfo, module: Any) -> None:
    """Refuse a plugin that defines the hook without ``@mtrun.hookimpl``: pluggy would pass
    over it, and the plugin would register nothing without a word."""
    if not callable(getattr(module, "mtrun_register_components", None)):
        return
    if any(impl.plugin is module for impl in pm.hook.mtrun_register_components.get_hookimpls()):
        return
    pm.unregister(module)
    raise PluginError(
        f"{info.describe()} defines mtrun_register_components without @mtrun.hookimpl, so it would register "
        "nothing: mark it with the decorator (docs/writing-a-plugin.md), or skip the plugin with "
        f"MTRUN_DISABLE_PLUGINS={info.name}"
    )


def check_api_version(info: PluginInfo, module: Any) -> None:
    """Refuse a plugin whose declared ``MTRUN_API`` range excludes this mtrun's API version.

    Raises:
        PluginError: Naming the plugin, its distribution, its range and this API version.
    """
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from mtrun import API_VERSION

    declared = getattr(module, "MTRUN_API", None)
    if declared is None:
        return
    try:
        supported = SpecifierSet(str(declared))
    except InvalidSpecifier as exc:
        raise PluginError(
            f"{info.describe()} declares MTRUN_API = {declared!r}, which is not a version range "
            f"(write e.g. '>=1.0,<2'): {exc}"
        ) from exc
    if API_VERSION not in supported:
        raise PluginError(
            f"{info.describe()} supports mtrun API {declared}, but this mtrun provides API {API_VERSION}; "
            "install a release of the plugin made for this mtrun, or disable it with MTRUN_DISABLE_PLUGINS"
        )


@functools.lru_cache(maxsize=1)
def get_plugins() -> PluginSet:
    """The process-wide plugin set, loaded on first use."""
    return load_plugins()
