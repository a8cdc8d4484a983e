"""atm, mlm and mam against hand computations; their negatives, labels and empty batches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import mtrun_mulap
import mulap_toys as toys
from mtrun import Batch, EncoderOutput
from mtrun.testing import check_component, isolated_registry
from mtrun_mulap.coattention import CoAttention
from mtrun_mulap.masking import MamMask, MlmMask
from mtrun_mulap.objectives import Atm, Mam, Mlm

SMALL_FUSION = CoAttention.Config(
    audio_width=16,
    audio_layers=1,
    audio_heads=4,
    co_width=16,
    co_heads=4,
    output_dim=8,
    dropout=0.0,
    attn_dropout=0.0,
)


@pytest.fixture(scope="module")
def registry():
    return isolated_registry(mtrun_mulap, toys)


@pytest.fixture
def encoders():
    torch.manual_seed(0)
    return toys.ToyChunks(toys.ToyChunks.Config()), toys.ToyBert(toys.ToyBert.Config())


@pytest.fixture
def fusion(encoders):
    audio_encoder, text_encoder = encoders
    return CoAttention(
        SMALL_FUSION, audio_features=audio_encoder.output_dim, text_features=text_encoder.output_dim
    ).eval()


def encode(encoders, texts=toys.CAPTIONS, seed=0):
    audio_encoder, text_encoder = encoders
    batch = toys.text_batch(text_encoder, texts)
    waves = torch.randn(len(texts), 2400, generator=torch.Generator().manual_seed(seed))
    audio = audio_encoder(audio_encoder.preprocess(waves))
    text = text_encoder(batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"])
    return batch, audio, text


def test_every_objective_honours_the_contract(registry, encoders, fusion):
    """Each objective, with and without the fusion, on the step it trains on (its augmenter's
    labels in the batch), so the contract check runs it and follows its gradient."""
    audio_encoder, text_encoder = encoders
    batch, audio, text = encode(encoders)
    fused = fusion(audio, text)
    audio_projector = toys.PooledLinear(toys.PooledLinear.Config(dim=8), in_features=audio.tokens.shape[-1])
    text_projector = toys.PooledLinear(toys.PooledLinear.Config(dim=8), in_features=text.tokens.shape[-1])
    two_tower = toys.step_outputs(batch, audio, text, audio_embedding=audio_projector(audio), text_embedding=text_projector(text))
    check_component(registry, "objective", "atm", fusion=fusion, inputs=toys.step_outputs(batch, audio, text, fused=fused))
    check_component(registry, "objective", "atm", audio_projector=audio_projector, inputs=two_tower)

    masked = MlmMask(MlmMask.Config(), text_encoder=text_encoder)(toys.text_batch(text_encoder, toys.CAPTIONS), toys.context(5))
    masked_text = text_encoder(masked.text_inputs["input_ids"], masked.text_inputs["attention_mask"])
    check_component(registry, "objective", "mlm", text_encoder=text_encoder, fusion=fusion, inputs=toys.step_outputs(masked, audio, masked_text, fused=fusion(audio, masked_text)))
    check_component(registry, "objective", "mlm", text_encoder=text_encoder, inputs=toys.step_outputs(masked, audio, masked_text))

    batch.audio_encoded = audio
    batch = MamMask(MamMask.Config(ratio=0.4))(batch, toys.context(3))
    mam_fused = fusion(batch.audio_encoded, text)
    check_component(registry, "objective", "mam", audio_encoder=audio_encoder, fusion=fusion, inputs=toys.step_outputs(batch, batch.audio_encoded, text, fused=mam_fused))
    check_component(registry, "objective", "mam", audio_encoder=audio_encoder, inputs=toys.step_outputs(batch, batch.audio_encoded, text))


# ----------------------------------------------------------------------------------- MAM


def test_mam_is_the_mse_over_masked_positions_of_the_unmasked_features(encoders, fusion):
    audio_encoder, _ = encoders
    batch, audio, text = encode(encoders)
    original = audio.tokens.detach().clone()
    batch.audio_encoded = audio
    batch = MamMask(MamMask.Config(ratio=0.4))(batch, toys.context(3))
    assert torch.equal(batch.mam_target, original)
    fused = fusion(batch.audio_encoded, text)
    mam = Mam(Mam.Config(), audio_encoder=audio_encoder, fusion=fusion)
    result = mam(toys.step_outputs(batch, batch.audio_encoded, text, fused=fused))
    # By hand: the head's prediction at each masked chunk against the original features.
    prediction = fused[0].tokens @ mam.head.weight.T + mam.head.bias
    errors = [
        ((prediction[i, j] - original[i, j]) ** 2).mean()
        for i, j in batch.mam_mask.nonzero().tolist()
    ]
    assert len(errors) == int(result.metrics["masked_chunks"]) > 0
    assert result.loss.item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)
    # Unmasked positions do not count: changing their targets changes nothing.
    batch.mam_target = torch.where(
        batch.mam_mask[..., None], batch.mam_target, batch.mam_target + 5.0
    )
    again = mam(toys.step_outputs(batch, batch.audio_encoded, text, fused=fused))
    assert again.loss.item() == pytest.approx(result.loss.item(), rel=1e-6)


def test_mam_without_a_fusion_reads_the_encoder_tokens_and_can_skip_swapped_rows(encoders):
    audio_encoder, _ = encoders
    batch, audio, text = encode(encoders)
    batch.audio_encoded = audio
    batch = MamMask(MamMask.Config(ratio=0.4))(batch, toys.context())
    batch.matched = torch.tensor([True, False, True, True, False, True])
    every = Mam(Mam.Config(), audio_encoder=audio_encoder)
    matched = Mam(Mam.Config(matched_only=True), audio_encoder=audio_encoder)
    matched.load_state_dict(every.state_dict())
    outputs = toys.step_outputs(batch, batch.audio_encoded, text)
    prediction = every.head(batch.audio_encoded.tokens)
    per_row = [
        ((prediction[i] - batch.mam_target[i]) ** 2).mean(1)[batch.mam_mask[i]] for i in range(6)
    ]
    assert every(outputs).loss.item() == pytest.approx(torch.cat(per_row).mean().item(), rel=1e-5)
    kept = [per_row[i] for i in range(6) if batch.matched[i]]
    assert matched(outputs).loss.item() == pytest.approx(torch.cat(kept).mean().item(), rel=1e-5)


def test_mam_without_masked_positions_is_zero_and_keeps_the_graph(encoders):
    audio_encoder, _ = encoders
    batch, audio, text = encode(encoders)
    mam = Mam(Mam.Config(), audio_encoder=audio_encoder)
    loss = mam(toys.step_outputs(batch, audio, text)).loss
    assert loss.item() == 0.0
    loss.backward()
    assert mam.head.weight.grad is not None and torch.isfinite(mam.head.weight.grad).all()


# ----------------------------------------------------------------------------------- MLM


def test_mlm_is_the_cross_entropy_of_the_labelled_tokens(encoders, fusion):
    _, text_encoder = encoders
    batch = toys.text_batch(text_encoder, toys.CAPTIONS)
    batch = MlmMask(MlmMask.Config(), text_encoder=text_encoder)(batch, toys.context(5))
    _, audio, text = encode(encoders)
    text = text_encoder(batch.text_inputs["input_ids"], batch.text_inputs["attention_mask"])
    fused = fusion(audio, text)
    mlm = Mlm(Mlm.Config(), text_encoder=text_encoder, fusion=fusion)
    result = mlm(toys.step_outputs(batch, audio, text, fused=fused))
    logits = mlm.head(fused[1].tokens)  # every position, then pick the labelled ones
    labels = batch.mlm_labels
    picked = [
        F.log_softmax(logits[i, j], dim=-1)[labels[i, j]]
        for i, j in (labels != -100).nonzero().tolist()
    ]
    assert result.loss.item() == pytest.approx(-torch.stack(picked).mean().item(), rel=1e-5)
    assert result.metrics["masked_tokens"] == len(picked)
    right = sum(
        int(logits[i, j].argmax() == labels[i, j]) for i, j in (labels != -100).nonzero().tolist()
    )
    assert float(result.metrics["accuracy"]) == pytest.approx(right / len(picked))


def test_mlm_without_labels_gives_a_zero_loss_with_zero_gradients(encoders):
    _, text_encoder = encoders
    batch, audio, text = encode(encoders)
    batch.mlm_labels = torch.full(batch.text_inputs["input_ids"].shape, -100)
    mlm = Mlm(Mlm.Config(), text_encoder=text_encoder)
    result = mlm(toys.step_outputs(batch, audio, text))
    assert result.loss.item() == 0.0 and torch.isfinite(result.loss)
    result.loss.backward()
    for parameter in mlm.parameters():
        assert parameter.grad is not None and (parameter.grad == 0).all()


def test_mlm_needs_a_text_encoder_with_a_mask_vocabulary():
    with pytest.raises(ValueError, match="objective mlm .* PlainText"):
        Mlm(Mlm.Config(), text_encoder=toys.PlainText(toys.PlainText.Config()))


def test_a_fusion_that_hides_its_stream_widths_is_named():
    class Opaque(torch.nn.Module):
        output_dim = 8

    with pytest.raises(ValueError, match="fusion Opaque does not declare .*'text_width'"):
        Mlm(Mlm.Config(), text_encoder=toys.ToyBert(toys.ToyBert.Config()), fusion=Opaque())


# ----------------------------------------------------------------------------------- ATM


def test_atm_is_the_cross_entropy_of_the_product_with_the_swap_labels(encoders, fusion):
    batch, audio, text = encode(encoders)
    batch.matched = torch.tensor([True, False, True, False, True, True])
    fused = fusion(audio, text)
    atm = Atm(Atm.Config(dropout=0.0), fusion=fusion)
    result = atm(toys.step_outputs(batch, audio, text, fused=fused))
    logits = (fused[0].pooled * fused[1].pooled) @ atm.classifier.weight.T + atm.classifier.bias
    probabilities = logits.softmax(-1)
    expected = (
        -sum(torch.log(probabilities[i, int(m)]) for i, m in enumerate(batch.matched.tolist())) / 6
    )
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    accuracy = (
        sum(int(probabilities[i].argmax()) == int(m) for i, m in enumerate(batch.matched.tolist()))
        / 6
    )
    assert float(result.metrics["accuracy"]) == pytest.approx(accuracy)


def test_atm_own_negatives_never_pair_an_item_with_its_own_caption():
    texts = ["piano", "rock", "piano", "jazz", "piano", "rock", "folk", "dance"]
    batch = Batch(texts=texts)
    n = len(texts)
    audio = torch.eye(n) + 1.0  # row i of the text embedding says which caption it is
    text = torch.arange(n, dtype=torch.float32)[:, None].expand(n, n).clone()
    atm = Atm(
        Atm.Config(),
        audio_projector=toys.PooledLinear(toys.PooledLinear.Config(dim=n), in_features=4),
    )
    torch.manual_seed(0)
    negatives, draws = 0, 500
    for _ in range(draws):
        _, paired, matched = atm._pairs(
            toys.step_outputs(
                batch, _dummy(n), _dummy(n), audio_embedding=audio, text_embedding=text
            )
        )
        source = paired[:, 0].long()
        for i in range(n):
            if matched[i]:
                assert source[i] == i
            else:
                assert source[i] != i and texts[source[i]] != texts[i]
        negatives += int((~matched).sum())
    assert abs(negatives / (draws * n) - 0.5) < 0.03  # 4000 Bernoulli(0.5): sd 0.008


def test_atm_without_a_fusion_uses_the_swap_labels_on_the_projections():
    n = 4
    batch = Batch(texts=["a", "b", "c", "d"], matched=torch.tensor([True, False, False, True]))
    audio, text = torch.randn(n, 8), torch.randn(n, 8)
    projector = toys.PooledLinear(toys.PooledLinear.Config(dim=8), in_features=4)
    atm = Atm(Atm.Config(), audio_projector=projector)
    outputs = toys.step_outputs(
        batch, _dummy(n), _dummy(n), audio_embedding=audio, text_embedding=text
    )
    got_audio, got_text, matched = atm._pairs(outputs)
    assert got_audio is audio and got_text is text and torch.equal(matched, batch.matched)


def _dummy(n):
    tokens = torch.zeros(n, 2, 4)
    return EncoderOutput(tokens, tokens[:, 0], torch.ones(n, 2, dtype=torch.bool))


def test_atm_with_a_fusion_and_no_swap_fuses_its_own_negatives(encoders, fusion):
    batch, audio, text = encode(encoders)
    fused = fusion(audio, text)
    atm = Atm(Atm.Config(p=1.0), fusion=fusion)
    torch.manual_seed(1)
    pooled_audio, pooled_text, matched = atm._pairs(
        toys.step_outputs(batch, audio, text, fused=fused)
    )
    assert not matched.any()  # p = 1 and six different captions
    for i in range(6):  # each pair is the fusion of audio i with some other item's caption
        candidates = []
        for j in range(6):
            if j == i:
                continue
            sub = lambda e, k: EncoderOutput(
                e.tokens[k : k + 1], e.pooled[k : k + 1], e.mask[k : k + 1]
            )
            a, t = fusion(sub(audio, i), sub(text, j))
            candidates.append(
                torch.allclose(a.pooled[0], pooled_audio[i], atol=1e-5)
                and torch.allclose(t.pooled[0], pooled_text[i], atol=1e-5)
            )
        assert sum(candidates) == 1


def test_atm_beside_a_contrastive_loss_in_a_two_tower_system(encoders):
    """No fusion, no caption-swap: ATM pairs projections with other items' text embeddings."""
    from mtrun import ObjectiveOutput, System, WeightedObjective

    class Contrastive(torch.nn.Module):
        def forward(self, outputs):
            a = F.normalize(outputs.audio_embedding, dim=-1)
            t = F.normalize(outputs.text_embedding, dim=-1)
            logits = a @ t.T / 0.1
            target = torch.arange(len(a))
            return ObjectiveOutput(
                loss=(F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            )

    audio_encoder, text_encoder = encoders
    projectors = [
        toys.PooledLinear(toys.PooledLinear.Config(dim=8), in_features=w) for w in (12, 16)
    ]
    atm = Atm(Atm.Config(), audio_projector=projectors[0])
    system = System(
        audio_encoder=audio_encoder,
        text_encoder=text_encoder,
        audio_projector=projectors[0],
        text_projector=projectors[1],
        objectives=[
            WeightedObjective("infonce", 1.0, Contrastive()),
            WeightedObjective("atm", 2.0, atm),
        ],
    )
    batch = Batch(
        waveforms=torch.randn(6, 2400),
        texts=toys.CAPTIONS,
        text_inputs=text_encoder.tokenize(toys.CAPTIONS),
    )
    torch.manual_seed(0)
    loss, metrics = system(batch, toys.context())
    loss.backward()
    assert {"atm/loss", "atm/accuracy", "infonce/loss"} <= set(metrics) and torch.isfinite(loss)
    for name, parameter in system.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_atm_needs_a_width_to_build_its_classifier():
    with pytest.raises(ValueError, match="needs a fusion .* or an audio_projector"):
        Atm(Atm.Config())
