"""The component registry: classes keyed by (kind, name), checked as they are registered."""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterator

import attrs

from mtrun import schema
from mtrun.errors import RegistrationError

__all__ = ["Component", "PluginInfo", "Registry", "suggest"]


@attrs.frozen
class PluginInfo:
    """Where a component came from: the entry point's name and its distribution."""

    name: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.distribution:
            return f"plugin '{self.name}' (distribution {self.distribution} {self.version or ''})".replace(" )", ")")
        return f"plugin '{self.name}'"


@attrs.frozen
class Component:
    kind: str
    name: str
    cls: type
    plugin: PluginInfo

    @property
    def config_class(self) -> type:
        return self.cls.Config

    @property
    def summary(self) -> str:
        """The class docstring's first paragraph as one line of plain text (reST roles and
        literals unmarked), for ``mtrun components``."""
        doc = (self.cls.__doc__ or "").strip()
        paragraph = " ".join(line.strip() for line in doc.split("\n\n", 1)[0].splitlines())
        paragraph = re.sub(r":[a-z]+:`~[\w.]*?(\w+)`", r"\1", paragraph)  # :class:`~mtrun.system.System` -> System
        paragraph = re.sub(r":[a-z]+:`([^`]+)`", r"\1", paragraph)
        return paragraph.replace("``", "")


def suggest(name: str, choices: Any) -> str | None:
    """The closest of ``choices`` to ``name``, for did-you-mean hints."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


class Registry:
    """Holds the registered components. Plugins receive it in ``mtrun_register_components``.

    The plugin manager sets :attr:`current_plugin` before calling each plugin's hook, so a name
    clash can name both plugins involved.
    """

    def __init__(self) -> None:
        self._components: dict[tuple[str, str], Component] = {}
        self.current_plugin = PluginInfo(name="<direct>")

    # ------------------------------------------------------------------ registration

    def add(self, kind: str, name: str, cls: type) -> None:
        """Register ``cls`` as the component ``name`` of ``kind``; checks the contract."""
        where = self.current_plugin.describe()
        declared = schema.kind(kind)
        if declared is None:
            kinds = [k.name for k in schema.KINDS]
            hint = suggest(kind, kinds)
            raise RegistrationError(
                f"{where} registers {name!r} under unknown kind {kind!r}"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + f"; kinds are: {', '.join(kinds)}"
            )
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"{where} registers a {kind} with an empty or non-string name")
        config = getattr(cls, "Config", None)
        if config is None or not attrs.has(config):
            raise RegistrationError(
                f"{where}: {kind} {name!r} ({cls.__qualname__}) has no attrs `Config` class; "
                "declare one with @attrs.frozen (it may have no fields)"
            )
        missing = [m for m in declared.methods if not callable(getattr(cls, m, None))]
        if missing:
            raise RegistrationError(
                f"{where}: {kind} {name!r} ({cls.__qualname__}) lacks the interface method(s) "
                f"{', '.join(missing)}"
            )
        for attribute in declared.attributes:
            value = getattr(cls, attribute.name, None)
            if attribute.on_class and not attribute.check(value):
                raise RegistrationError(
                    f"{where}: {kind} {name!r} declares {attribute.name} {value!r}; expected {attribute.expected}"
                )
        existing = self._components.get((kind, name))
        # The same class again from the same plugin is harmless; from another plugin it would
        # silently take the name over (and `mtrun plugins` would credit the wrong one).
        if existing is not None and (existing.cls is not cls or existing.plugin.name != self.current_plugin.name):
            raise RegistrationError(
                f"{kind} {name!r} is registered twice: by {existing.plugin.describe()} "
                f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by {where} "
                f"({cls.__module__}.{cls.__qualname__}); disable one with MTRUN_DISABLE_PLUGINS"
            )
        self._components[(kind, name)] = Component(kind, name, cls, self.current_plugin)

    def remove_plugin(self, plugin_name: str) -> None:
        """Forget every component ``plugin_name`` registered (a plugin that failed part-way)."""
        self._components = {key: c for key, c in self._components.items() if c.plugin.name != plugin_name}

    # ------------------------------------------------------------------------ lookup

    def get(self, kind: str, name: str) -> Component:
        """The component, or KeyError (use :meth:`names` to explain what exists)."""
        return self._components[(kind, name)]

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._components if k == kind)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._components

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._components.values(), key=lambda c: (c.kind, c.name)))

    def __len__(self) -> int:
        return len(self._components)


def _shortcut(kind_name: str):
    def register(self: Registry, name: str, cls: type) -> None:
        self.add(kind_name, name, cls)

    register.__name__ = kind_name
    register.__doc__ = f"Register ``cls`` as the {kind_name} ``name`` (same as ``add({kind_name!r}, name, cls)``)."
    return register


# One shortcut per declared kind: registry.audio_encoder("mert", MertEncoder), ...
for _kind in schema.KINDS:
    setattr(Registry, _kind.name, _shortcut(_kind.name))
