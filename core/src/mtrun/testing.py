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

__all__ = ["ContractError", "check_component", "config_converter", "isolated_registry", "resolve", "synthetic_batch", "synthetic_outputs"]


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
    inputs: Any = None,
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
      projectors return ``[B, output_dim]``, data sources load a split of samples;
      objectives return ``ObjectiveOutput`` with a finite scalar loss whose gradient reaches
      the model's outputs (run on :func:`synthetic_outputs`); augmenters return their stage's
      type with shapes and dtypes kept (``features`` augmenters must not write into their
      input; ``audio_tokens`` ones leave an ascending in-range ``audio_keep_index``), run on
      :func:`synthetic_batch` (or a sample, or waveforms).

    Args:
        registry: Usually from :func:`isolated_registry`.
        kind: Component kind (``audio_encoder``, ``projector``, ...).
        name: Registered name.
        config: Config instance to build with; defaults to ``cls.Config()``.
        forward: Run the small forward pass (turn off for components that download weights).
        batch_size: Items in the test batch.
        input_seconds: Length of the test waveform for audio encoders and augmenters.
        inputs: What the forward check feeds an objective (a ``StepOutputs``) or an augmenter
            (its stage's value), when the synthetic one lacks what the component reads.
        **deps: Constructor dependencies, injected by keyword as the assembler would.

    Raises:
        ContractError: With every problem found.
    """
    try:
        component = registry.get(kind, name)
    except KeyError:
        from mtrun.registry import suggest
        from mtrun.schema import KINDS

        kinds = [k.name for k in KINDS]
        if kind not in kinds:
            hint = suggest(kind, kinds)
            raise ContractError(f"{kind} {name!r}", [f"{kind!r} is no component kind" + (f" (did you mean {hint!r}?)" if hint else "")
                                                     + f"; kinds: {', '.join(kinds)}"]) from None
        known = ", ".join(registry.names(kind)) or "none"
        hint = suggest(name, registry.names(kind))
        raise ContractError(f"{kind} {name!r}", ["not registered" + (f" (did you mean {hint!r}?)" if hint else "")
                                                 + f"; registered {kind}s: {known}"]) from None
    cls = component.cls
    subject = f"{kind} {name!r} ({cls.__module__}.{cls.__qualname__}, {component.plugin.describe()})"
    problems: list[str] = []

    config = _check_config(cls, config, problems, registry)
    if kind == "projector":
        deps.setdefault("in_features", 16)
    if kind == "fusion":
        deps.setdefault("audio_features", 16)
        deps.setdefault("text_features", 16)
    instance = _construct(cls, config, deps, problems) if config is not None else None
    if instance is None:
        raise ContractError(subject, problems)

    _check_attributes(kind, instance, problems)
    if forward and not problems:
        import torch

        try:
            with torch.no_grad():
                if kind in ("objective", "augmenter"):
                    _FORWARD_CHECKS[kind](instance, problems, batch_size, inputs, deps)
                else:
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
    """Trainers and evals need a whole system to run; their contract is structural."""


def _shape(t: Any) -> Any:
    return tuple(t.shape) if hasattr(t, "shape") else type(t).__name__


def _check_encoder_output(out: Any, batch: int, width: int, what: str, problems: list[str], tokens: int | None = None) -> None:
    import torch

    from mtrun.interfaces import EncoderOutput

    if not isinstance(out, EncoderOutput):
        problems.append(f"{what} returned {type(out).__name__}, expected mtrun.EncoderOutput")
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


def _check_fusion(fusion: Any, problems: list[str], batch: int, seconds: float, deps: dict[str, Any]) -> None:
    """Both encoders' outputs in (widths ``audio_features``, ``text_features``), two fused
    streams out: tokens of ``audio_width``/``text_width``, pooled ``[B, output_dim]``."""
    import torch

    from mtrun.interfaces import EncoderOutput

    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[0, 5:] = False

    def encoded(width: int, n: int) -> EncoderOutput:
        tokens = torch.randn(batch, n, width, generator=gen)
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=mask[:, :n])

    if hasattr(fusion, "eval"):
        fusion.eval()
    out = fusion(encoded(deps["audio_features"], 5), encoded(deps["text_features"], 7))
    if not (isinstance(out, tuple) and len(out) == 2):
        problems.append(f"forward(audio, text) must return the fused (audio, text) streams as a tuple of two mtrun.EncoderOutput (got {type(out).__name__})")
        return
    for stream, width, n, label in ((out[0], fusion.audio_width, 5, "the fused audio stream"), (out[1], fusion.text_width, 7, "the fused text stream")):
        if not isinstance(stream, EncoderOutput):
            problems.append(f"{label} must be an mtrun.EncoderOutput (got {type(stream).__name__})")
            continue
        if not (torch.is_tensor(stream.tokens) and tuple(stream.tokens.shape) == (batch, n, width)):
            problems.append(f"{label}: tokens must be [B={batch}, N={n}, width={width}] (got {_shape(stream.tokens)})")
        if not (torch.is_tensor(stream.pooled) and tuple(stream.pooled.shape) == (batch, fusion.output_dim)):
            problems.append(f"{label}: pooled must be [B={batch}, output_dim={fusion.output_dim}] (got {_shape(stream.pooled)})")
        elif not torch.isfinite(stream.pooled).all():
            problems.append(f"{label}: pooled contains NaN or inf")


def synthetic_batch(batch_size: int = 2, *, seconds: float = 1.0, sample_rate: int = 16_000, seed: int = 0) -> Any:
    """A collated :class:`mtrun.Batch` with every documented field, for testing a component
    outside a system: waveforms, captions with genre/mood/instrument words and matching tags,
    tokenised text (byte ids, the second row padded), ``features``/``clean_features``
    ``[B, 1, 32, 16]`` with a ``(4, 4)`` token grid, and encoder outputs of width 16."""
    import torch

    from mtrun.interfaces import Batch, EncoderOutput

    gen = torch.Generator().manual_seed(seed)
    texts = ["a calm piano piece for a quiet evening", "an upbeat rock song with electric guitar"]
    texts = (texts * batch_size)[:batch_size]
    tags = [{"genre": ["classical"], "mood": ["calm"], "instrument": ["piano"]}, {"genre": ["rock"], "mood": ["upbeat"], "instrument": ["electric guitar"]}]
    tags = (tags * batch_size)[:batch_size]
    length = max(len(t) for t in texts)
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids[i, : len(text)] = torch.tensor(list(text.encode())) + 1
    attention = (ids != 0).long()
    features = torch.randn(batch_size, 1, 32, 16, generator=gen)
    mask = attention.bool()
    return Batch(
        ids=[f"item-{i}" for i in range(batch_size)],
        waveforms=0.1 * torch.randn(batch_size, max(1, int(seconds * sample_rate)), generator=gen),
        texts=texts,
        tags=tags,
        groups=[None] * batch_size,
        text_inputs={"input_ids": ids, "attention_mask": attention},
        skipped=[],
        clean_features=features,
        features=features.clone(),
        token_grid=(4, 4),
        audio_encoded=EncoderOutput(tokens=torch.randn(batch_size, 16, 16, generator=gen), pooled=torch.randn(batch_size, 16, generator=gen), mask=torch.ones(batch_size, 16, dtype=torch.bool)),
        text_encoded=EncoderOutput(tokens=torch.randn(batch_size, length, 16, generator=gen), pooled=torch.randn(batch_size, 16, generator=gen), mask=mask),
    )


def synthetic_outputs(batch_size: int = 4, *, dim: int = 16, seed: int = 0) -> Any:
    """A :class:`mtrun.StepOutputs` over :func:`synthetic_batch` whose embeddings ``[B, dim]``
    and encoder tokens/pooled vectors are leaves requiring grad, so a test can check that an
    objective's loss reaches them."""
    import torch

    from mtrun.interfaces import EncoderOutput, StepOutputs

    batch = synthetic_batch(batch_size, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    audio, text = batch.audio_encoded, batch.text_encoded
    audio = EncoderOutput(tokens=leaf(*audio.tokens.shape), pooled=leaf(*audio.pooled.shape), mask=audio.mask)
    text = EncoderOutput(tokens=leaf(*text.tokens.shape), pooled=leaf(*text.pooled.shape), mask=text.mask)
    batch.audio_encoded, batch.text_encoded = audio, text
    return StepOutputs(batch=batch, audio=audio, text=text, audio_embedding=leaf(batch_size, dim), text_embedding=leaf(batch_size, dim))


_INPUTS_HINT = "; if the component reads more than the synthetic input carries, pass inputs= to check_component"


def _check_objective(obj: Any, problems: list[str], batch: int, inputs: Any, deps: dict[str, Any]) -> None:
    import torch

    from mtrun.interfaces import ObjectiveOutput

    outputs = inputs if inputs is not None else synthetic_outputs(max(batch, 2))
    if hasattr(obj, "train"):
        obj.train()
    with torch.enable_grad():
        try:
            result = obj(outputs)
        except Exception as exc:  # noqa: BLE001 - a crash is a contract failure to report
            problems.append(f"forward(StepOutputs) raised {type(exc).__name__}: {exc}{'' if inputs is not None else _INPUTS_HINT}")
            return
        if not isinstance(result, ObjectiveOutput):
            problems.append(f"forward must return mtrun.ObjectiveOutput (got {type(result).__name__})")
            return
        loss = result.loss
        if not (torch.is_tensor(loss) and loss.numel() == 1):
            problems.append(f"ObjectiveOutput.loss must be a scalar tensor (got {_shape(loss)})")
            return
        if not torch.isfinite(loss).all():
            problems.append(f"the loss is not finite ({loss.item()})")
            return
        for key, value in result.metrics.items():
            if not (isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)):
                problems.append(f"metric {key!r} must be a number or a 0-d tensor (got {_shape(value)})")
        leaves = [t for t in (outputs.audio_embedding, outputs.text_embedding, outputs.audio.tokens, outputs.audio.pooled, outputs.text.tokens, outputs.text.pooled) if torch.is_tensor(t) and t.requires_grad]
        if not loss.requires_grad:
            problems.append("the loss has no gradient: it must depend on the model's outputs")
            return
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if leaves and all(g is None or not g.abs().sum() > 0 for g in grads):
            problems.append("the loss's gradient reaches none of the embeddings or encoder outputs")


def _check_augmenter(aug: Any, problems: list[str], batch: int, inputs: Any, deps: dict[str, Any]) -> None:
    import torch

    from mtrun.interfaces import AugmentContext, Batch, EncoderOutput, Sample

    context = AugmentContext(step=0, epoch=0, steps_per_epoch=10, total_steps=100, training=True, generator=torch.Generator().manual_seed(0))
    stage = aug.stage
    full = synthetic_batch(batch)
    if inputs is not None:
        value = inputs
    elif stage == "waveform":
        value = full.waveforms
    elif stage == "features":
        value = full.clean_features
    elif stage == "sample":
        value = Sample(id="item-0", audio=full.waveforms[0], sample_rate=16_000, captions=[full.texts[0]], tags=full.tags[0])
    else:
        value = full
    before = value.clone() if torch.is_tensor(value) else None
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in (value.items() if isinstance(value, Batch) else ()) if torch.is_tensor(v)}
    # The encoders' outputs an `encoded` augmenter may replace: replaced, they keep their shapes.
    shapes.update({f"{k}.{field}": (tuple(t.shape), t.dtype) for k, v in (value.items() if isinstance(value, Batch) else ())
                   if isinstance(v, EncoderOutput) for field in ("tokens", "pooled", "mask") if torch.is_tensor(t := getattr(v, field))})
    try:
        out = aug(value, context)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{stage} augmenter raised {type(exc).__name__}: {exc}{'' if inputs is not None else _INPUTS_HINT}")
        return
    if before is not None:
        if not (torch.is_tensor(out) and out.shape == before.shape and out.dtype == before.dtype):
            problems.append(f"{stage} augmenter must keep the shape {tuple(before.shape)} and dtype {before.dtype} (got {_shape(out)}, {getattr(out, 'dtype', None)})")
        if not torch.equal(value, before):
            problems.append(f"{stage} augmenter wrote into its input; return a new tensor (the input may be kept, e.g. clean_features)")
        return
    if stage == "sample":
        if not isinstance(out, Sample):
            problems.append(f"sample augmenter must return an mtrun.Sample (got {type(out).__name__})")
        return
    if not isinstance(out, Batch):
        problems.append(f"{stage} augmenter must return the mtrun.Batch (got {type(out).__name__})")
        return
    for key, (shape, dtype) in shapes.items():
        name, _, field = key.partition(".")
        now = getattr(out.get(name), field, None) if field else out.get(name)
        if torch.is_tensor(now) and (tuple(now.shape), now.dtype) != (shape, dtype):
            problems.append(f"{stage} augmenter changed batch.{key} from {shape} {dtype} to {tuple(now.shape)} {now.dtype}")
    keep = out.get("audio_keep_index")
    if keep is not None:
        grid = full.token_grid[0] * full.token_grid[1]
        if not (torch.is_tensor(keep) and keep.ndim == 2 and keep.shape[0] == batch and keep.dtype == torch.long):
            problems.append(f"audio_keep_index must be a LongTensor [B={batch}, N'] (got {_shape(keep)}, {getattr(keep, 'dtype', None)})")
        elif keep.numel() and (keep.min() < 0 or keep.max() >= grid or not bool((keep[:, 1:] > keep[:, :-1]).all())):
            problems.append(f"audio_keep_index must hold ascending grid positions in [0, {grid})")


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
                problems.append(f"load({splits[0]!r})[0] lacks {attr!r}; yield mtrun.Sample")


_FORWARD_CHECKS = {
    "audio_encoder": _check_audio_encoder,
    "text_encoder": _check_text_encoder,
    "projector": _check_projector,
    "fusion": _check_fusion,
    "augmenter": _check_augmenter,
    "objective": _check_objective,
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
