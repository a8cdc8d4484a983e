"""How much a frozen, randomly initialised tiny MERT tells about the demo corpus' instruments.

The DuET-MC tiny profile trains on frozen random MERT features, so their quality bounds what it
can learn. For each front-end layout below (random weights, seed 0) this encodes the centre 2 s
of 700 training clips and of every test clip, keeps each clip's time mean and std of the
layer-averaged hidden states, fits a logistic regression on the training clips' first
instrument tag and prints test accuracy and encoding time per batch of 32 as a ratio to the
first layout (same run, same inputs). Chance is the majority class. plugins/mert/README.md and
docs/duet_mc_ablation.md quote its output.

    python benchmarks/mert_tiny_probe.py
"""

from __future__ import annotations

import collections
import random
import time

import numpy as np
import soundfile as sf
import torch
import torchaudio
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mtrun_demo import DemoCorpus
from mtrun_mert.encoder import PRESETS, SAMPLE_RATE
from mtrun_mert.loading import hubert_config_from_dict

LAYOUTS = {
    "330M layout (layer-norm front end, pre-LN), width 32": {"do_stable_layer_norm": True, "feat_extract_norm": "layer", "hidden_size": 32, "intermediate_size": 64},
    "95M layout (group-norm front end, post-LN), width 32": {"hidden_size": 32, "intermediate_size": 64},
    "95M layout, width 64 (the `tiny` preset)": {},
}


def centre_crop(path: str, seconds: float = 2.0) -> torch.Tensor:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(audio.mean(1))
    half = int(rate * seconds / 2)
    mid = len(mono) // 2
    return torchaudio.functional.resample(mono[mid - half : mid + half], rate, SAMPLE_RATE)


@torch.no_grad()
def features(model: torch.nn.Module, waves: torch.Tensor, batch: int = 32) -> tuple[np.ndarray, float]:
    out, start = [], time.perf_counter()
    for i in range(0, len(waves), batch):
        x = waves[i : i + batch]
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)
        layers = torch.stack(model(input_values=x, output_hidden_states=True).hidden_states, 1).mean(1)
        out.append(torch.cat([layers.mean(1), layers.std(1)], -1))
    seconds_per_batch = (time.perf_counter() - start) / max(1, len(waves) / batch)
    return torch.cat(out).numpy(), seconds_per_batch


def main() -> int:
    from transformers import HubertModel

    torch.set_num_threads(1)
    splits = DemoCorpus(DemoCorpus.Config()).build()
    train = random.Random(0).sample(splits["train"], 700)
    test = splits["test"]
    label = lambda s: s.tags["instrument"][0]  # noqa: E731
    x_train = torch.stack([centre_crop(s.audio) for s in train])
    x_test = torch.stack([centre_crop(s.audio) for s in test])
    y_train, y_test = [label(s) for s in train], [label(s) for s in test]
    majority = collections.Counter(y_test).most_common(1)[0][1] / len(y_test)
    print(f"{len(train)} training / {len(test)} test clips, {len(set(y_train))} instruments; majority class {majority:.1%}")
    baseline = None
    for name, changes in LAYOUTS.items():
        torch.manual_seed(0)
        model = HubertModel(hubert_config_from_dict({**PRESETS["tiny"], **changes})).eval()
        f_train, seconds = features(model, x_train)
        f_test, _ = features(model, x_test)
        scaler = StandardScaler().fit(f_train)
        probe = LogisticRegression(max_iter=2000).fit(scaler.transform(f_train), y_train)
        baseline = baseline or seconds
        print(f"{name}: accuracy {probe.score(scaler.transform(f_test), y_test):.1%}, time per batch {seconds / baseline:.2f}x the first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
