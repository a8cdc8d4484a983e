"""Toy text/audio arms for the InfoNCE tests, and the torchrun script that checks DDP.

Run as ``python -m torch.distributed.run --nproc_per_node 2 infonce_ddp_check.py OUT``: each
rank trains a DistributedDataParallel copy of a tiny model on its share of a global batch
(ranks hold different numbers of items, groups that span ranks, and hard negatives on one,
both or no ranks) and writes, per scenario, the loss and the gradients next to those of one
process computing the same global batch. The test reads ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mtrun import Batch, EncoderOutput, HardNegatives, StepOutputs

WIDTH, DIM, FEATURES = 8, 6, 5


class ToyText(nn.Module):
    """Hashed words -> embedding -> masked mean; ``tokenize`` like a real text encoder."""

    output_dim = WIDTH
    max_length = 12

    def __init__(self, vocab: int = 97):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, WIDTH)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [[1 + zlib.crc32(w.encode()) % (self.vocab - 1) for w in t.split()][: self.max_length] for t in texts]
        length = max(1, max((len(r) for r in rows), default=1))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids, attention_mask, *, output_hidden_states=False) -> EncoderOutput:
        tokens = self.embed(input_ids)
        mask = attention_mask.bool()
        w = mask.unsqueeze(-1).float()
        return EncoderOutput(tokens=tokens, pooled=(tokens * w).sum(1) / w.sum(1).clamp_min(1.0), mask=mask)


class ToyProjector(nn.Module):
    output_dim = DIM

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, DIM)

    def forward(self, encoded: EncoderOutput) -> torch.Tensor:
        return self.linear(encoded.pooled)


class ToyModel(nn.Module):
    """Audio features -> Linear; texts -> ToyText -> ToyProjector; InfoNCE on top."""

    def __init__(self, objective_config):
        super().__init__()
        from mtrun_infonce.objective import InfoNCE

        self.audio = nn.Linear(FEATURES, DIM)
        self.text_encoder = ToyText()
        self.text_projector = ToyProjector(WIDTH)
        self.objective = InfoNCE(objective_config, text_encoder=self.text_encoder, text_projector=self.text_projector)

    def forward(self, features: torch.Tensor, batch: Batch):
        inputs = self.text_encoder.tokenize(batch["texts"])
        text = self.text_encoder(inputs["input_ids"], inputs["attention_mask"])
        audio_embedding = self.audio(features)
        outputs = StepOutputs(
            batch=batch,
            audio=EncoderOutput(tokens=features[:, None], pooled=features, mask=torch.ones(len(features), 1, dtype=torch.bool)),
            text=text,
            audio_embedding=audio_embedding,
            text_embedding=self.text_projector(text),
        )
        return self.objective(outputs)


WORDS = "calm piano rock guitar jazz drums violin ambient synth dark bright fast slow loud".split()


def global_batch(n: int = 7, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, FEATURES, generator=gen)
    texts = [" ".join(WORDS[int(k)] for k in torch.randint(len(WORDS), (3 + i % 3,), generator=gen)) for i in range(n)]
    # Items 1 and 5 (on different ranks) share a track, as do 2 and 3.
    groups = ["t0", "shared", "pair", "pair", "t4", "shared", None][:n]
    return features, texts, groups


# Per rank: (anchor, replaces) in that rank's local indices, and the caption.
HARD = {
    "both": {0: [(0, 2, "loud rock drums"), (1, -1, "dark synth")], 1: [(0, 3, "slow violin jazz")]},
    "one": {1: [(2, 0, "bright ambient piano"), (2, -1, "fast guitar"), (3, 1, "calm calm")]},
    "none": {},
}
SIZES = (3, 4)


def rank_batch(features, texts, groups, rank: int, scenario: str, *, as_texts: bool = True):
    start = sum(SIZES[:rank])
    sl = slice(start, start + SIZES[rank])
    batch = Batch(texts=texts[sl], groups=groups[sl])
    hard = HARD[scenario].get(rank)
    if hard:
        batch.hard_negatives = HardNegatives(
            anchor=torch.tensor([h[0] for h in hard]),
            replaces=torch.tensor([h[1] for h in hard]),
            texts=[h[2] for h in hard],
        )
    return features[sl], batch


def merged_batch(features, texts, groups, scenario: str):
    """The single-process batch: all ranks' items and hard negatives, indices made global."""
    batch = Batch(texts=list(texts), groups=list(groups))
    anchor, replaces, captions = [], [], []
    for rank, hard in sorted(HARD[scenario].items()):
        start = sum(SIZES[:rank])
        for a, r, text in hard:
            anchor.append(a + start)
            replaces.append(r + start if r >= 0 else -1)
            captions.append(text)
    if anchor:
        batch.hard_negatives = HardNegatives(anchor=torch.tensor(anchor), replaces=torch.tensor(replaces), texts=captions)
    return features, batch


def main(out: str) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import mtrun
    from mtrun_infonce.objective import InfoNCE

    torch.set_num_threads(1)
    mtrun.init_from_env("cpu")
    rank, world = mtrun.rank(), mtrun.world_size()
    assert world == len(SIZES), world
    config = InfoNCE.Config(temperature=0.1, learnable=True, mask_same_group=True)
    features, texts, groups = global_batch()
    results = {}
    for scenario in HARD:
        torch.manual_seed(0)
        model = ToyModel(config)
        torch.manual_seed(0)
        reference = ToyModel(config)
        ddp = DistributedDataParallel(model)
        local_features, local_batch = rank_batch(features, texts, groups, rank, scenario)
        result = ddp(local_features, local_batch)
        result.loss.backward()

        with mtrun.local_only():
            ref_features, ref_batch = merged_batch(features, texts, groups, scenario)
            expected = reference(ref_features, ref_batch)
        expected.loss.backward()

        grads = {name: p.grad for name, p in model.named_parameters()}
        grad_error = max(float((grads[name] - p.grad).abs().max()) for name, p in reference.named_parameters())
        results[scenario] = {
            "loss": float(result.loss.detach()),
            "expected_loss": float(expected.loss.detach()),
            "grad_max_error": grad_error,
            "grad_max": max(float(p.grad.abs().max()) for p in reference.parameters()),
            "metrics": {k: float(v) for k, v in result.metrics.items()},
            "expected_metrics": {k: float(v) for k, v in expected.metrics.items()},
        }
        dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "scenarios": results}))
    mtrun.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
