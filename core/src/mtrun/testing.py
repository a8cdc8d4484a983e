"""Helpers for testing plugins: an isolated registry and a component contract check.

Nothing here needs pytest; plain ``assert``-style code or any test runner can call it. When
pytest is installed, the module also defines two fixtures, enabled in a plugin's
``conftest.py`` with ``pytest_plugins = ["mtrun.testing"]``:

* ``mtrun_plugin_modules``: the plugin modules under test; override it in your conftest.
* ``mtrun_registry``: a registry holding core's built-ins and exactly those modules, never
  whatever else happens to be installed in the environment.

Example::

    from mtrun.testing import check_component, isolated_registry

    import my_plugin  # your plugin's package

    def test_my_encoder_honours_the_contract():
        registry = isolated_registry(my_plugin)
        check_component(registry, "audio_encoder", "my-encoder", input_seconds=0.5)
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any, Sequence

import attrs

from mtrun import schema
from mtrun.registry import PluginInfo, Registry

__all__ = ["ContractError", "check_component", "config_converter", "isolated_registry", "resolve"]


class ContractError(AssertionError):
    """A component breaks the contract; the message lists every problem found.

    An ``AssertionError`` so that test runners report it as a failed check, not a crash.
    """

    def __init__(self, subject: str, problems: Sequence[str]):
        self.subject = subject
        self.problems = list(problems)
        super().__init__(f"{subject} breaks the component contract:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _plugin_name(module: Any) -> str:
    """``mtrun_mert`` -> ``mert``: the name an entry point would normally give the plugin."""
    name = getattr(module, "__name__", None) or type(module).__name__  # a module, or an object with the hook
    return name[len("mtrun_") :] if name.startswith("mtrun_") else name


def isolated_registry(*plugin_modules: Any, builtins: bool = True) -> Registry:
    """A registry filled by the given plugin modules alone, ignoring installed entry points.

    Args:
        *plugin_modules: Plugin modules (or their dotted import paths, or any object)
            implementing ``mtrun_register_components``.
        builtins: Also register core's own components (``mtrun.builtins``), as a real run does.

    Returns:
        The filled :class:`~mtrun.registry.Registry`. Loading runs the same checks as start-up
        (hook names, registration rules), so a broken plugin fails here with the same
        :class:`~mtrun.errors.PluginError` users would see.
    """
    from mtrun.plugins import load_plugins

    modules = [importlib.import_module(m) if isinstance(m, str) else m for m in plugin_modules]
    extra: list[tuple[PluginInfo, Any]] = []
    if builtins:
        extra.append((PluginInfo(name="builtins", distribution="mtrun"), importlib.import_module("mtrun.builtins")))
    extra.extend((PluginInfo(name=_plugin_name(m)), m) for m in modules)
    return load_plugins(extra=extra, entry_points=False).registry


def config_converter(registry: Registry | None = None) -> Any:
    """The cattrs converter recipes are structured with (extra keys and loose types refused),
    so a config that passes here also loads from a recipe. Pass the ``registry`` for configs
    with nested components (:func:`mtrun.component_field`)."""
    from mtrun.recipe import make_converter

    return make_converter(registry)


def resolve(recipe: dict[str, Any], registry: Registry, source: str = "<test recipe>") -> Any:
    """Check a recipe (a plain dict, as TOML would give) the way ``mtrun validate`` does.

    Returns the resolved recipe (``.components``, ``.objectives``, ... hold each component's
    structured config); raises :class:`mtrun.RecipeError` whose ``problems`` are the lines
    ``mtrun validate`` would print. Use it to test that your component's tables, nested tables
    and contracts (``provides``/``requires``) are checked as you intend.
    """
    from mtrun.recipe import resolve_recipe

    return resolve_recipe(recipe, registry, source)


# ------------------------------------------------------------------------------- the check


def check_component(
    registry: Registry,
    kind: str,
    name: str,
    *,
    config: Any = None,
    forward: bool = True,
    batch_size: int = 2,
    input_seconds: float = 1.0,
    **deps: Any,
) -> Any:
    """Check that a registered component honours its interface; return the built instance.

    Checks, collecting every problem before failing:

    * the ``Config`` class is attrs, frozen, documents each field with ``metadata["help"]``,
      default-constructs, and round-trips through cattrs unstructure/structure with extra keys
      forbidden (what a recipe table and the saved ``recipe.toml`` go through);
    * ``cls(config, **deps)`` builds, every keyword-only dependency without a default being
      supplied in ``deps`` (the names the assembler injects: ``audio_encoder``,
      ``text_encoder``, ``audio_projector``, ``text_projector``, ``in_features``, ``system``,
      ``data``, ``run``, ``evals``); projectors get ``in_features=16`` unless given;
    * the interface's attributes are there (an audio encoder's ``sample_rate``,
      ``output_dim``, ``token_grid``; an augmenter's ``stage``; ...);
    * with ``forward=True``, a small input goes through and the outputs have the documented
      shapes: encoders return ``EncoderOutput`` with ``tokens [B, N, D]``, ``pooled [B, D]``,
      ``mask [B, N]`` (and honour ``keep_index`` when they declare a ``token_grid``),
      projectors return ``[B, output_dim]``, waveform augmenters keep the shape, data sources
      load a split of samples.

    Args:
        registry: Usually from :func:`isolated_registry`.
        kind: Component kind (``audio_encoder``, ``projector``, ...).
        name: Registered name.
        config: Config instance to build with; defaults to ``cls.Config()``.
        forward: Run the small forward pass (turn off for components that download weights).
        batch_size: Items in the test batch.
        input_seconds: Length of the test waveform for audio encoders and augmenters.
        **deps: Constructor dependencies, injected by keyword as the assembler would.

    Raises:
        ContractError: With every problem found.
    """
    try:
        component = registry.get(kind, name)
    except KeyError:
        known = ", ".join(registry.names(kind)) or "none"
        raise ContractError(f"{kind} {name!r}", [f"not registered (registered {kind}s: {known})"]) from None
    cls = component.cls
    subject = f"{kind} {name!r} ({cls.__module__}.{cls.__qualname__}, {component.plugin.describe()})"
    problems: list[str] = []

    config = _check_config(cls, config, problems, registry)
    if kind == "projector":
        deps.setdefault("in_features", 16)
    instance = _construct(cls, config, deps, problems) if config is not None else None
    if instance is None:
        raise ContractError(subject, problems)

    _check_attributes(kind, instance, problems)
    if forward and not problems:
        import torch

        try:
            with torch.no_grad():
                _FORWARD_CHECKS.get(kind, _no_forward_check)(instance, problems, batch_size, input_seconds, deps)
        except Exception as exc:  # noqa: BLE001 - a crash is a contract failure to report
            problems.append(f"forward check raised {type(exc).__name__}: {exc}")
    if problems:
        raise ContractError(subject, problems)
    return instance


def _check_config(cls: type, config: Any, problems: list[str], registry: Registry) -> Any:
    config_cls = getattr(cls, "Config", None)
    if config_cls is None or not attrs.has(config_cls):
        problems.append("has no attrs `Config` class")
        return None
    for field in attrs.fields(config_cls):
        if not field.metadata.get("help"):
            problems.append(f"Config.{field.name} has no help text (attrs.field(metadata={{'help': ...}}))")
    if config is None:
        try:
            config = config_cls()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"Config() cannot be built with defaults: {type(exc).__name__}: {exc}")
            return None
    fields = attrs.fields(type(config))
    if fields:
        try:
            setattr(config, fields[0].name, getattr(config, fields[0].name))
            problems.append("Config is mutable; declare it with @attrs.frozen so a built component cannot drift from its recipe")
        except attrs.exceptions.FrozenInstanceError:
            pass
    converter = config_converter(registry)
    try:
        data = converter.unstructure(config)
        again = converter.structure(data, type(config))
        if again != config:
            problems.append(f"Config does not round-trip through cattrs: {config!r} -> {data!r} -> {again!r}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"Config does not round-trip through cattrs: {type(exc).__name__}: {exc}")
    else:
        try:
            converter.structure({**data, "__not_a_field__": 1}, type(config))
            problems.append("Config accepted an unknown key; recipes must be able to reject typos")
        except Exception:  # noqa: BLE001 - rejecting it is the point
            pass
    return config


def _construct(cls: type, config: Any, deps: dict[str, Any], problems: list[str]) -> Any:
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_positional = [p.name for p in positional[1:] if p.default is p.empty]
    if required_positional:
        problems.append(
            f"constructor takes {', '.join(required_positional)} positionally; dependencies must be "
            "keyword-only (`def __init__(self, config, *, dep)`) so the assembler can inject them"
        )
        return None
    missing = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in deps]
    if missing:
        problems.append(f"constructor needs {', '.join(missing)}: pass them to check_component(..., {missing[0]}=...)")
        return None
    accepted = {p.name for p in params} | ({*deps} if any(p.kind is p.VAR_KEYWORD for p in params) else set())
    kwargs = {k: v for k, v in deps.items() if k in accepted}
    try:
        return cls(config, **kwargs)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{cls.__qualname__}(config{''.join(', ' + k + '=...' for k in kwargs)}) raised {type(exc).__name__}: {exc}")
        return None


def _check_attributes(kind: str, obj: Any, problems: list[str]) -> None:
    """The methods and attributes :mod:`mtrun.schema` declares for ``kind``, on the instance."""
    declared = schema.kind(kind)
    for method in declared.methods:
        if not callable(getattr(obj, method, None)):
            problems.append(f"instance lacks the interface method {method}()")
    for attribute in declared.attributes:
        if not hasattr(obj, attribute.name):
            problems.append(f"{attribute.name} is missing; expected {attribute.expected}")
        elif not attribute.check(getattr(obj, attribute.name)):
            problems.append(f"{attribute.name} must be {attribute.expected} (got {getattr(obj, attribute.name)!r})")
    config = getattr(obj, "config", None)
    try:
        provided = schema.declared_provides(type(obj), config)
        needs = schema.declared_requires(type(obj), config)
    except Exception as exc:  # noqa: BLE001 - a crash is a contract failure to report
        problems.append(f"provides/requires raised {type(exc).__name__}: {exc}")
        return
    for capability in provided:
        if not isinstance(capability, str) or not capability:
            problems.append(f"provides must name capabilities as strings (got {capability!r})")
    for need in needs:
        if not isinstance(need, schema.Need) or schema.slot(need.slot) is None:
            slots = ", ".join(s.name for s in schema.SLOTS)
            problems.append(f"requires must hold mtrun.Need(slot, capability) with slot one of {slots} (got {need!r})")


# ----------------------------------------------------------------------- forward checks


def _no_forward_check(*_: Any) -> None:
    """Objectives, trainers and evals need a whole system to run; their contract is structural."""


def _shape(t: Any) -> Any:
    return tuple(t.shape) if hasattr(t, "shape") else type(t).__name__


def _check_encoder_output(out: Any, batch: int, width: int, what: str, problems: list[str], tokens: int | None = None) -> None:
    import torch

    from mtrun.interfaces import EncoderOutput

    if not isinstance(out, EncoderOutput):
        problems.append(f"{what} returned {type(out).__name__}, expected mtrun.interfaces.EncoderOutput")
        return
    if not (torch.is_tensor(out.tokens) and out.tokens.ndim == 3 and out.tokens.shape[0] == batch and out.tokens.shape[2] == width):
        problems.append(f"{what}: tokens must be [B={batch}, N, D={width}] (got {_shape(out.tokens)})")
        return
    n = out.tokens.shape[1]
    if tokens is not None and n != tokens:
        problems.append(f"{what}: expected {tokens} tokens (got {n})")
    if not (torch.is_tensor(out.pooled) and tuple(out.pooled.shape) == (batch, width)):
        problems.append(f"{what}: pooled must be [B={batch}, D={width}] (got {_shape(out.pooled)})")
    if not (torch.is_tensor(out.mask) and tuple(out.mask.shape) == (batch, n) and out.mask.dtype == torch.bool):
        problems.append(f"{what}: mask must be bool [B={batch}, N={n}] (got {_shape(out.mask)}, {getattr(out.mask, 'dtype', None)})")
    for t, label in ((out.tokens, "tokens"), (out.pooled, "pooled")):
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            problems.append(f"{what}: {label} contains NaN or inf")
    if out.hidden_states is not None:
        if not isinstance(out.hidden_states, tuple) or not all(torch.is_tensor(h) and h.shape[0] == batch for h in out.hidden_states):
            problems.append(f"{what}: hidden_states must be a tuple of [B, ...] tensors")


def _check_audio_encoder(enc: Any, problems: list[str], batch: int, seconds: float, deps: dict[str, Any]) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    waveforms = 0.1 * torch.randn(batch, max(1, int(seconds * enc.sample_rate)), generator=gen)
    if hasattr(enc, "eval"):
        enc.eval()
    features = enc.preprocess(waveforms)
    if not (torch.is_tensor(features) and features.shape[0] == batch):
        problems.append(f"preprocess([B={batch}, T]) must return a tensor with batch first (got {_shape(features)})")
        return
    out = enc(features)
    grid = enc.token_grid
    full = grid[0] * grid[1] if grid is not None else None
    _check_encoder_output(out, batch, enc.output_dim, "forward(features)", problems)
    if problems or grid is None:
        return
    # Patch encoders may prepend a [CLS]; the grid tokens are what keep_index selects from.
    n = out.tokens.shape[1]
    if n not in (full, full + 1):
        problems.append(f"token_grid {grid} promises {full} grid tokens; forward returned {n}")
        return
    keep = torch.stack([torch.randperm(full, generator=gen)[: max(1, full // 4)].sort().values for _ in range(batch)])
    dropped = enc(features, keep_index=keep)
    _check_encoder_output(dropped, batch, enc.output_dim, "forward(features, keep_index=[B, N'])", problems, tokens=n - full + keep.shape[1])
    if isinstance(getattr(dropped, "keep_index", None), torch.Tensor) and not torch.equal(dropped.keep_index, keep):
        problems.append("forward(keep_index=...) must return the keep_index it was given in EncoderOutput.keep_index")


def _check_text_encoder(enc: Any, problems: list[str], batch: int, seconds: float, deps: dict[str, Any]) -> None:
    import torch

    texts = ["a calm piano melody", "an upbeat rock song with distorted electric guitars and loud drums"]
    texts = (texts * batch)[:batch]
    inputs = enc.tokenize(texts)
    if not isinstance(inputs, dict) or not {"input_ids", "attention_mask"} <= set(inputs):
        problems.append(f"tokenize must return a dict with input_ids and attention_mask (got {type(inputs).__name__})")
        return
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if not (torch.is_tensor(ids) and ids.ndim == 2 and ids.shape[0] == batch and tuple(mask.shape) == tuple(ids.shape)):
        problems.append(f"tokenize: input_ids and attention_mask must both be [B={batch}, L] (got {_shape(ids)}, {_shape(mask)})")
        return
    if ids.shape[1] > enc.max_length:
        problems.append(f"tokenize returned {ids.shape[1]} tokens, more than max_length={enc.max_length}")
    if hasattr(enc, "eval"):
        enc.eval()
    _check_encoder_output(enc(ids, mask), batch, enc.output_dim, "forward(input_ids, attention_mask)", problems)


def _check_projector(proj: Any, problems: list[str], batch: int, seconds: float, deps: dict[str, Any]) -> None:
    import torch

    from mtrun.interfaces import EncoderOutput

    width = deps["in_features"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, 5, width, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 3:] = False
    if hasattr(proj, "eval"):
        proj.eval()
    out = proj(EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=mask))
    if not (torch.is_tensor(out) and tuple(out.shape) == (batch, proj.output_dim)):
        problems.append(f"forward(EncoderOutput with width {width}) must return [B={batch}, output_dim={proj.output_dim}] (got {_shape(out)})")
    elif not torch.isfinite(out).all():
        problems.append("forward returned NaN or inf")


def _check_augmenter(aug: Any, problems: list[str], batch: int, seconds: float, deps: dict[str, Any]) -> None:
    import torch

    from mtrun.interfaces import AugmentContext

    if aug.stage != "waveform":
        return  # other stages need a real batch or sample; their plugin tests cover them
    context = AugmentContext(step=0, epoch=0, steps_per_epoch=10, total_steps=100, training=True, generator=torch.Generator().manual_seed(0))
    waveforms = 0.1 * torch.randn(batch, max(1, int(seconds * 16000)))
    out = aug(waveforms, context)
    if not (torch.is_tensor(out) and out.shape == waveforms.shape):
        problems.append(f"waveform augmenter must keep the shape {tuple(waveforms.shape)} (got {_shape(out)})")


def _check_data(source: Any, problems: list[str], batch: int, seconds: float, deps: dict[str, Any]) -> None:
    splits = list(source.splits())
    if not splits or not all(isinstance(s, str) for s in splits):
        problems.append(f"splits() must return split names (got {splits!r})")
        return
    samples = source.load(splits[0])
    try:
        count = len(samples)
    except TypeError:
        problems.append(f"load({splits[0]!r}) must return a sequence with len() (got {type(samples).__name__})")
        return
    if count:
        first = samples[0]
        for attr in ("id", "audio", "captions", "tags"):
            if not hasattr(first, attr):
                problems.append(f"load({splits[0]!r})[0] lacks {attr!r}; yield mtrun.interfaces.Sample")


_FORWARD_CHECKS = {
    "audio_encoder": _check_audio_encoder,
    "text_encoder": _check_text_encoder,
    "projector": _check_projector,
    "augmenter": _check_augmenter,
    "data": _check_data,
}


# ---------------------------------------------------------------------------- pytest


try:
    import pytest
except ImportError:  # pragma: no cover - the helpers above work without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def mtrun_plugin_modules() -> Sequence[ModuleType | str]:
        """The plugin modules ``mtrun_registry`` loads; override in your ``conftest.py``."""
        return ()

    @pytest.fixture
    def mtrun_registry(mtrun_plugin_modules: Sequence[ModuleType | str]) -> Registry:
        """A registry of core's built-ins plus ``mtrun_plugin_modules``, nothing installed."""
        return isolated_registry(*mtrun_plugin_modules)
