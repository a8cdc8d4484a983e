"""Does FLAP's token masking buy compute? Encoder forward+backward time vs kept fraction.

Times forward + backward of the mavil encoder on one batch of features with 1.0, 0.64, 0.36
and 0.25 of the token grid kept (the exact kept counts are printed), and prints each as a ratio to the unmasked
time measured in the same run (median of ``--repeats`` after a warm-up). The fbank front end is
outside the timed region: masking cannot change it.

    python benchmarks/masking.py                      # ViT-B (preset base), batch 2, float32
    python benchmarks/masking.py --bf16               # bf16 autocast, also as a ratio to float32
                                                      # (fast only on CPUs with AMX/AVX512-BF16)
    python benchmarks/masking.py --preset tiny --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

FRACTIONS = (1.0, 0.64, 0.36, 0.25)


def keep_for(fraction: float, grid: tuple[int, int], batch: int, seed: int = 0):
    """Keep index with ``floor(fraction * N)`` tokens, or None (no masking) for 1.0.

    1-D draws hit the target fractions exactly (2-D ones round M' and K' separately: 0.8 x 0.8
    of 64 x 8 keeps 51 x 6 = 0.598); the cost depends only on how many tokens are kept.
    """
    import torch
    from mtrun_token_mask.masking import sample_keep_index

    if fraction >= 1.0:
        return None
    return sample_keep_index(batch, grid, mode="1d", ratio=1.0 - fraction, generator=torch.Generator().manual_seed(seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", help="mavil preset (base = ViT-B, 512 tokens; tiny for a quick look)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="run under torch.autocast(bfloat16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)

    import torch
    from mtrun_mavil.encoder import MavilEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc = MavilEncoder(MavilEncoder.Config(preset=args.preset)).to(device).train()
    grid = enc.token_grid
    full = grid[0] * grid[1]
    with torch.no_grad():
        features = enc.preprocess(0.1 * torch.randn(args.batch, enc.target_length * 160 + 240, device=device))

    def step(keep, bf16: bool = args.bf16) -> float:
        enc.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = enc(features, keep_index=keep)
            loss = out.tokens.float().square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    keeps = {f: keep_for(f, grid, args.batch) for f in FRACTIONS}
    for keep in keeps.values():  # warm-up every shape once
        step(None if keep is None else keep.to(device))
    times: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    fp32_times: list[float] = []  # with --bf16: the float32 unmasked step, as a second baseline
    if args.bf16:
        step(None, bf16=False)
    for _ in range(args.repeats):  # interleave so drift hits every fraction alike
        for f, keep in keeps.items():
            times[f].append(step(None if keep is None else keep.to(device)))
        if args.bf16:
            fp32_times.append(step(None, bf16=False))
    base = statistics.median(times[1.0])
    print(
        f"mavil {args.preset}: {full} tokens {grid}, width {enc.output_dim}, batch {args.batch}, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, {device.type}, {torch.get_num_threads()} threads"
    )
    print(f"{'target kept':>11} {'kept tokens':>12} {'time / unmasked':>16}")
    for f in FRACTIONS:
        kept = full if keeps[f] is None else keeps[f].shape[1]
        print(f"{f:>11.2f} {kept:>5}/{full:<6} {statistics.median(times[f]) / base:>16.3f}")
    print(f"(unmasked forward+backward: {base * 1000:.0f} ms per batch; ratios are medians of {args.repeats})")
    if args.bf16:
        fp32 = statistics.median(fp32_times)
        print(f"bf16 autocast / float32, unmasked: {base / fp32:.3f} (float32: {fp32 * 1000:.0f} ms per batch)")
        if device.type == "cpu":
            from mtrun.train.trainer import cpu_has_fast_bf16

            print(f"this CPU multiplies bf16 in hardware (AMX or AVX512-BF16): {cpu_has_fast_bf16()}")


if __name__ == "__main__":
    main()
