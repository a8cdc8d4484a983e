"""Discovering plugins through the ``mtrun`` entry-point group and building the registry.

Environment:
    MTRUN_LOAD_PLUGINS: comma-separated entry-point names; only these (and core's ``builtins``)
        are loaded. Set it empty to load core alone.
    MTRUN_DISABLE_PLUGINS: comma-separated entry-point names that are not loaded.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata
from typing import Any, Iterable

import attrs
import pluggy

from mtrun import hookspecs
from mtrun.errors import PluginError
from mtrun.registry import PluginInfo, Registry

__all__ = ["LoadedPlugin", "PluginSet", "check_api_version", "get_plugins", "load_plugins"]

ENTRY_POINT_GROUP = "mtrun"
BUILTINS = "builtins"


@attrs.frozen
class LoadedPlugin:
    info: PluginInfo
    module: Any


@attrs.frozen
class PluginSet:
    """The loaded plugins and the registry they filled."""

    plugins: tuple[LoadedPlugin, ...]
    registry: Registry

    def components_of(self, plugin_name: str) -> list[tuple[str, str]]:
        return [(c.kind, c.name) for c in self.registry if c.plugin.name == plugin_name]


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
            continue
        if only is not None and ep.name != BUILTINS and ep.name not in only:
            continue
        if ep.name in chosen and chosen[ep.name].value != ep.value:
            first, second = chosen[ep.name], ep
            raise PluginError(
                f"two distributions declare the mtrun entry point {ep.name!r}: "
                f"{_dist_name(first)} ({first.value}) and {_dist_name(second)} ({second.value})"
            )
        chosen[ep.name] = ep
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


def load_plugins(extra: Iterable[tuple[PluginInfo, Any]] = (), *, entry_points: bool = True) -> PluginSet:
    """Import every selected plugin, check its hooks and let it register its components.

    Args:
        extra: In-process plugins (``(info, module_or_object)``) registered after the entry
            points; tests use this with ``entry_points=False`` for an isolated registry.
        entry_points: Whether to discover plugins through the ``mtrun`` entry-point group.

    Raises:
        PluginError: A plugin failed to import, declares an unknown ``mtrun_`` hook, or
            registered a component that breaks the registry's rules.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    loaded: list[LoadedPlugin] = []
    candidates: list[tuple[PluginInfo, Any]] = []
    if entry_points:
        for ep in _selected_entry_points():
            info = _info(ep)
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's
                raise PluginError(
                    f'Error importing plugin "{ep.name}" (entry point {ep.name} = {ep.value!r} '
                    f"in distribution {info.distribution or '<unknown>'} {info.version or ''}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            candidates.append((info, module))
    candidates.extend(extra)

    for info, module in candidates:
        check_api_version(info, module)
        try:
            pm.register(module, name=info.name)
        except ValueError as exc:
            raise PluginError(f"{info.describe()} could not be registered: {exc}") from exc
        loaded.append(LoadedPlugin(info, module))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (a misspelled hook? see mtrun.hookspecs)") from exc

    registry = Registry()
    by_name = {p.info.name: p.info for p in loaded}
    # Calling each implementation directly lets the registry know who is registering.
    for impl in reversed(pm.hook.mtrun_register_components.get_hookimpls()):
        registry.current_plugin = by_name[impl.plugin_name]
        try:
            impl.function(registry=registry)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise PluginError(
                f"{registry.current_plugin.describe()} failed while registering its components: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    registry.current_plugin = PluginInfo(name="<direct>")
    return PluginSet(tuple(loaded), registry)


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
