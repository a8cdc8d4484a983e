"""MAE reconstruction: loss ignores visible patches, order restoration, patchify layout, shapes."""

from __future__ import annotations

import pytest
import torch

import mtrun_mae_recon
from mtrun import Batch, EncoderOutput, MtrunError, StepOutputs
from mtrun.testing import check_component, isolated_registry
from mtrun_mae_recon.objective import MaeReconstruction, patchify, restore_order


class FakeEncoder:
    """What the objective reads from an audio encoder: grid, width, patch size."""

    token_grid = (4, 2)
    output_dim = 8
    patch_size = 4


SMALL = MaeReconstruction.Config(decoder_dim=16, depth=1, heads=2)


def _objective(**kw) -> MaeReconstruction:
    torch.manual_seed(0)
    return MaeReconstruction(MaeReconstruction.Config(**{"decoder_dim": 16, "depth": 1, "heads": 2, **kw}), audio_encoder=FakeEncoder())


def _outputs(features, keep_index, tokens=None) -> StepOutputs:
    b = features.shape[0]
    n = keep_index.shape[1] if keep_index is not None else 8
    tokens = torch.randn(b, n, 8) if tokens is None else tokens
    audio = EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=torch.ones(b, n, dtype=torch.bool), keep_index=keep_index)
    text = EncoderOutput(tokens=torch.zeros(b, 1, 8), pooled=torch.zeros(b, 8), mask=torch.ones(b, 1, dtype=torch.bool))
    return StepOutputs(batch=Batch(features=features), audio=audio, text=text, audio_embedding=torch.zeros(b, 4), text_embedding=torch.zeros(b, 4))


def test_mae_recon_honours_the_component_contract():
    # It reads the spectrogram and which tokens were kept: a 16×8 log-mel, 3 of the 4×2 grid.
    keep = torch.tensor([[0, 3, 6], [1, 2, 7]])
    tokens = torch.randn(2, 3, 8, requires_grad=True)
    inputs = _outputs(torch.randn(2, 1, 16, 8), keep, tokens=tokens)
    obj = check_component(isolated_registry(mtrun_mae_recon), "objective", "mae-recon", config=SMALL, audio_encoder=FakeEncoder(), inputs=inputs)
    assert obj.num_tokens == 8
    default = MaeReconstruction.Config()
    assert (default.decoder_dim, default.depth, default.heads) == (512, 4, 4)


def test_patchify_is_time_major_and_frame_by_frame():
    features = torch.arange(16 * 8, dtype=torch.float).reshape(1, 1, 16, 8)  # value = frame * 8 + bin
    patches = patchify(features, 4)
    assert patches.shape == (1, 8, 16)
    t, f = 2, 1  # patch t*K + f covers frames 8..11 and bins 4..7
    expected = torch.tensor([frame * 8 + b for frame in range(8, 12) for b in range(4, 8)], dtype=torch.float)
    assert torch.equal(patches[0, t * 2 + f], expected)


def test_restore_order_puts_kept_tokens_back_in_place():
    kept = torch.tensor([[[10.0], [20.0], [30.0]]])  # tokens of grid places 1, 4, 6, in that order
    keep_index = torch.tensor([[1, 4, 6]])
    full = restore_order(kept, keep_index, torch.tensor([-1.0]), total=8)
    assert full[0, :, 0].tolist() == [-1, 10, -1, -1, 20, -1, 30, -1]


def test_loss_gradient_reaches_only_dropped_target_patches():
    obj = _objective()
    features = torch.randn(2, 1, 16, 8, requires_grad=True)
    keep = torch.tensor([[0, 3, 5], [1, 2, 7]])
    out = obj(_outputs(features, keep))
    out.loss.backward()
    grad = patchify(features.grad, 4).abs().sum(-1)  # [B, 8] per target patch
    kept = torch.zeros(2, 8, dtype=torch.bool).scatter_(1, keep, True)
    assert torch.all(grad[kept] == 0)
    assert torch.all(grad[~kept] > 0)
    assert out.metrics["masked_fraction"].item() == pytest.approx(5 / 8)


def test_perturbing_visible_patches_leaves_the_loss_unchanged():
    obj = _objective(norm_pix_loss=True)
    features = torch.randn(2, 1, 16, 8)
    keep = torch.tensor([[0, 3, 5], [1, 2, 7]])
    tokens = torch.randn(2, 3, 8)
    base = obj(_outputs(features, keep, tokens)).loss
    noisy = features.clone()
    for b, places in enumerate(keep.tolist()):
        for i in places:
            t, f = divmod(i, 2)
            noisy[b, 0, t * 4 : t * 4 + 4, f * 4 : f * 4 + 4] += 5.0 * torch.randn(4, 4)
    assert obj(_outputs(noisy, keep, tokens)).loss.item() == pytest.approx(base.item(), abs=0)
    dropped = features.clone()
    dropped[0, 0, 4:8, 0:4] += torch.randn(4, 4)  # patch 2 of item 0 was dropped (not a constant: norm_pix_loss removes those)
    assert obj(_outputs(dropped, keep, tokens)).loss.item() != base.item()


def test_loss_is_the_masked_mse_of_the_decoder_predictions():
    obj = _objective()
    features = torch.randn(2, 1, 16, 8)
    keep = torch.tensor([[0, 3, 5], [1, 2, 7]])
    tokens = torch.randn(2, 3, 8)
    pred = obj.decode(tokens, keep)
    assert pred.shape == (2, 8, 16)
    target = patchify(features, 4)
    dropped = [[i for i in range(8) if i not in row] for row in keep.tolist()]
    errors = [((pred[b, i] - target[b, i]) ** 2).mean() for b in range(2) for i in dropped[b]]
    expected = torch.stack(errors).mean()
    torch.testing.assert_close(obj(_outputs(features, keep, tokens)).loss, expected)


def test_no_dropped_tokens_gives_zero_loss_and_says_so():
    obj = _objective()
    out = obj(_outputs(torch.randn(2, 1, 16, 8), None))
    assert out.loss.item() == 0.0 and out.metrics["skipped"] == 1.0
    out.loss.backward()  # connected to every decoder parameter, with zero gradient
    assert all(p.grad is not None and not p.grad.any() for p in obj.parameters())


def test_gridless_encoder_is_refused():
    class NoGrid:
        token_grid = None
        output_dim = 8

    with pytest.raises(MtrunError, match="token grid"):
        MaeReconstruction(SMALL, audio_encoder=NoGrid())


def test_with_the_mavil_encoder_and_token_mask():
    mavil = pytest.importorskip("mtrun_mavil.encoder")
    masking = pytest.importorskip("mtrun_token_mask.masking")
    enc = mavil.MavilEncoder(mavil.MavilEncoder.Config(preset="tiny"))
    obj = MaeReconstruction(MaeReconstruction.Config(decoder_dim=32, depth=1, heads=2), audio_encoder=enc)
    features = enc.preprocess(0.1 * torch.randn(2, 16000 * 2))
    keep = masking.sample_keep_index(2, enc.token_grid, mode="2d", generator=torch.Generator().manual_seed(0))
    audio = enc(features, keep_index=keep)
    out = obj(_outputs(features, keep, audio.tokens))
    out.loss.backward()
    assert torch.isfinite(out.loss) and enc.patch_embed.proj.weight.grad is not None


class GridAudio(torch.nn.Module):
    """A gridded encoder over ``[B, 1, 16, 8]`` features (a 4 x 2 grid of 4 x 4 patches)."""

    token_grid = (4, 2)
    output_dim = 8
    patch_size = 4
    sample_rate = 16000

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)

    def preprocess(self, waveforms):
        return waveforms.reshape(waveforms.shape[0], 1, 16, 8)

    def forward(self, features, *, keep_index=None, output_hidden_states=False):
        tokens = self.proj(patchify(features, 4))
        if keep_index is not None:
            tokens = torch.gather(tokens, 1, keep_index[..., None].expand(-1, -1, 8))
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        return EncoderOutput(tokens=tokens, pooled=tokens.mean(1), mask=mask, keep_index=keep_index)


class ConstText(torch.nn.Module):
    output_dim = 8

    def forward(self, input_ids, attention_mask):
        b = input_ids.shape[0]
        return EncoderOutput(tokens=torch.zeros(b, 1, 8), pooled=torch.zeros(b, 8), mask=torch.ones(b, 1, dtype=torch.bool))


class Pool(torch.nn.Module):
    output_dim = 8

    def forward(self, encoded):
        return encoded.pooled


class ZeroBand:
    """SpecAugment-like: zeroes frequency bins 0..3 of every frame (stage ``features``)."""

    stage = "features"
    applies_in_eval = False

    def __call__(self, features, context):
        return torch.where(torch.arange(features.shape[-1]) < 4, torch.zeros(()), features)


class KeepFixed:
    """Keeps grid places 0, 3, 5 of every item (stage ``audio_tokens``)."""

    stage = "audio_tokens"
    applies_in_eval = False

    def __call__(self, batch, context):
        batch.audio_keep_index = torch.tensor([[0, 3, 5]] * len(batch.waveforms))
        return batch


def test_target_is_the_features_before_features_augmenters():
    from mtrun import AugmentContext
    from mtrun import System, WeightedObjective

    torch.manual_seed(0)
    audio = GridAudio()
    obj = MaeReconstruction(SMALL, audio_encoder=audio)
    system = System(
        audio_encoder=audio,
        text_encoder=ConstText(),
        audio_projector=Pool(),
        text_projector=Pool(),
        objectives=[WeightedObjective("recon", 1.0, obj)],
        augmenters=[ZeroBand(), KeepFixed()],
    )
    waveforms = torch.randn(2, 128) + 3.0  # no patch is near zero, so a zeroed band shows
    batch = Batch(waveforms=waveforms, texts=["a", "b"], text_inputs={"input_ids": torch.zeros(2, 1, dtype=torch.long), "attention_mask": torch.ones(2, 1)})
    context = AugmentContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, training=True)
    outputs = system.encode(batch, context)
    clean = waveforms.reshape(2, 1, 16, 8)
    assert torch.equal(outputs.batch.clean_features, clean)
    assert torch.all(outputs.batch.features[..., :4] == 0)  # the encoder did see the augmented features

    keep = torch.tensor([[0, 3, 5]] * 2)
    pred = obj.decode(outputs.audio.tokens, keep)
    dropped = [i for i in range(8) if i not in (0, 3, 5)]

    def masked_mse(target):
        patches = patchify(target, 4)
        return torch.stack([((pred[b, i] - patches[b, i]) ** 2).mean() for b in range(2) for i in dropped]).mean()

    loss = obj(outputs).loss
    torch.testing.assert_close(loss, masked_mse(clean))
    assert not torch.allclose(loss, masked_mse(outputs.batch.features))
