"""MAViL's batched kaldi fbank on a CPU: blocked (the default) vs one pass vs torchaudio per clip.

``mtrun_mavil.fbank.kaldi_fbank`` computes a batch's frames a block at a time on a CPU (a few
hundred frames, so every intermediate stays small); ``block_frames=0`` is the single pass a GPU
uses. Both are timed against ``torchaudio.compliance.kaldi.fbank`` called once per clip (what
AudioMAE does), in this run, on the quickstart's batch (32 clips of 2.56 s) and on a ViT-B batch
(8 clips of 10.24 s), and the outputs are compared.

    python benchmarks/fbank.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time


def timed(fn, repeats: int) -> float:
    """Best-of-three mean seconds per call (a shared machine only ever slows a call down)."""
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the loader worker uses 1)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import torch
    import torchaudio
    from mtrun_mavil.fbank import kaldi_fbank, mel_banks
    from plain_loop import cpu_report

    torch.set_num_threads(args.threads)
    print(cpu_report())
    banks, window = mel_banks(), torch.hann_window(400, periodic=False)
    generator = torch.Generator().manual_seed(0)
    for label, clips, seconds in (("quickstart batch", 32, 2.56), ("ViT-B batch", 8, 10.24)):
        x = 0.1 * torch.randn(clips, int(16000 * seconds), generator=generator)

        def per_clip():
            return torch.stack([
                torchaudio.compliance.kaldi.fbank(x[i : i + 1], htk_compat=True, sample_frequency=16000, use_energy=False,
                                                  window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
                for i in range(clips)
            ])

        reference = per_clip()
        times = {"torchaudio, per clip": timed(per_clip, args.repeats)}
        for name, block in (("one pass", 0), ("blocked (default)", None)):
            out = kaldi_fbank(x, banks, window, block_frames=block)
            error = (out - reference).abs().max().item()
            times[name] = timed(lambda: kaldi_fbank(x, banks, window, block_frames=block), args.repeats)
            print(f"{label}: {name} max |difference| from torchaudio {error:.2e}")
        base = times["torchaudio, per clip"]
        print(f"{label} ({clips} clips of {seconds:g} s):")
        for name, seconds_per_call in times.items():
            print(f"  {name:<22} {seconds_per_call * 1000:7.2f} ms  ({base / seconds_per_call:4.2f}x torchaudio per clip)")
        print(f"  blocked / one pass: {times['one pass'] / times['blocked (default)']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
