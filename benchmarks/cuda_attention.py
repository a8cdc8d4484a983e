"""xformers against PyTorch SDPA inside a ViT-B training step on a CUDA GPU.

Every transformer block that mtrun writes itself calls :func:`mtrun.nn.attention`, which uses
xformers' memory-efficient kernels on CUDA when xformers imports and PyTorch's
``scaled_dot_product_attention`` otherwise. This script checks that the xformers path is the
one ``auto`` picks on this machine, that it gives SDPA's numbers, and what it buys: MAViL's
ViT-B (12 blocks of width 768 over 512 + 1 tokens of a 10.24 s fbank) trained for a step
(forward, backward, AdamW) under ``torch.autocast(bfloat16)``, as the trainer runs it, with
each backend forced in turn, interleaved, with and without a key padding mask (what token
dropping and padded captions produce). It prints each time as a ratio to SDPA's in the same
run, and the step's model FLOPs utilisation against this GPU's bf16 matmul peak, measured here.

    python benchmarks/cuda_attention.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys


def cuda_seconds(fn, repeats: int) -> list[float]:
    """Seconds per call of ``fn``, timed with CUDA events after two warm-up calls."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def bf16_matmul_peak(size: int = 8192, repeats: int = 10) -> float:
    """Best FLOP/s of a ``size``-square bf16 matmul: this GPU's attainable peak."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size**3 / min(cuda_seconds(lambda: a @ b, repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("cuda_attention.py: no CUDA device here; this benchmark is for GPU machines", file=sys.stderr)
        return 2
    attn = importlib.import_module("mtrun.nn.attention")  # the module (mtrun.nn exports the function under that name)
    from mtrun_mavil.encoder import MavilEncoder
    from torch.utils.flop_counter import FlopCounterMode

    try:
        import xformers

        xf_version = xformers.__version__
    except Exception as error:  # noqa: BLE001 - report, then measure SDPA alone
        xf_version = f"not importable ({type(error).__name__}: {error})"
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; xformers {xf_version}")
    print(f"attention backend 'auto' resolves to: {attn.resolve_backend(device)}")

    # Numbers first: the two kernels on the same inputs, with a padding mask and a bias.
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, 12, 513, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    mask = torch.rand(4, 513, device="cuda", generator=gen) > 0.3
    backends = ["sdpa"] + (["xformers"] if attn.xformers_available() else [])
    outs = {b: attn.attention(q, k, v, key_padding_mask=mask, backend=b).float() for b in backends}
    if "xformers" in outs:
        diff = (outs["xformers"] - outs["sdpa"]).abs().max().item()
        print(f"xformers vs SDPA, bf16 [4, 12, 513, 64] with a padding mask: max |difference| {diff:.2e}")

    torch.manual_seed(0)
    encoder = MavilEncoder(MavilEncoder.Config(preset="base")).to(device).train()
    features = torch.randn(args.batch, 1, encoder.target_length, encoder.num_mel_bins, device=device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4, fused=True)
    n_tokens = 513

    def step(backend: str, masked: bool) -> None:
        with attn.attention_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            if masked:  # the blocks directly, with a quarter of each clip's tokens padded out
                x = torch.randn(args.batch, n_tokens, 768, device=device)
                keep = torch.arange(n_tokens, device=device)[None] < int(0.75 * n_tokens)
                for block in encoder.blocks:
                    x = block(x, key_padding_mask=keep.expand(args.batch, -1))
                loss = x.float().square().mean()
            else:
                loss = encoder(features).pooled.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)  # under SDPA: aten kernels it can count (xformers' are not)
    with counter, attn.attention_backend("sdpa"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = encoder(features).pooled.float().square().mean()
        out.backward()
    encoder.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    peak = bf16_matmul_peak()
    print(f"bf16 matmul peak (8192^3): {peak / 1e12:.0f} TFLOP/s")

    for masked in (False, True):
        times: dict[str, list[float]] = {b: [] for b in backends}
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            for b in backends:
                times[b] += cuda_seconds(lambda b=b: step(b, masked), 1)
        label = "blocks with a padding mask" if masked else "ViT-B step (encoder forward + backward + AdamW)"
        base = statistics.median(times["sdpa"])
        for b in backends:
            median = statistics.median(times[b])
            mfu = "" if masked else f", MFU {flops / median / peak:.1%} (model FLOPs; the step's time includes AdamW)"
            print(f"{label}, batch {args.batch}, {b}: {median * 1e3:.1f} ms median, ratio to SDPA {median / base:.3f}{mfu}")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
