"""Approximate search (FAISS HNSW, as ``mtrun search --approximate`` builds it) against exact
search on 100,000 random vectors: recall@10 and query time, both measured in the same run.

    python benchmarks/search_recall.py                      # dims 64 and 512, efSearch 64..512
    python benchmarks/search_recall.py --dims 512 --ef 128  # one setting
    python benchmarks/search_recall.py --data clustered     # vectors around 1,000 centres

Each database vector and each query is drawn i.i.d. from a standard normal and L2-normalised
(``--data uniform``, the default: uniform on the sphere, the hardest case for any approximate
index, since nothing is close to anything), or drawn around 1,000 random centres with noise of
the same norm as the centre (``--data clustered``, closer to real embeddings, whose neighbours
are much nearer than random pairs). The ground truth is exact search through
:class:`mtrun.inference.search.Index` (``queries @ vectors.T``, top 10); the approximate result is
the HNSW index that ``Index.hnsw()`` builds (M = 32, efConstruction = 80, inner product),
searched at each efSearch. Printed per setting: recall@10 (the share of the exact top 10 that the
approximate top 10 holds, averaged over queries), the speed-up (exact query time / approximate
query time, the same queries) and the one-off build time. Runs on ``--threads`` FAISS and
PyTorch threads (default 1, so the figures do not depend on what else the machine runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# BLAS threads are fixed when NumPy loads: set them from --threads before importing it.
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import numpy as np  # noqa: E402


def vectors(n: int, dim: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        x = rng.standard_normal((n, dim))
    else:
        centres = rng.standard_normal((1000, dim))
        x = centres[rng.integers(0, 1000, n)] + rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="database vectors (default 100,000)")
    parser.add_argument("--queries", type=int, default=500, help="queries (default 500)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512], help="embedding widths (default 64 512)")
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256, 512], help="efSearch values")
    parser.add_argument("--data", choices=("uniform", "clustered"), default="uniform")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss

    from mtrun.inference.search import HNSW_EF_CONSTRUCTION, HNSW_M, Index
    from mtrun.inference.store import EmbeddingSet

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    print(f"{args.n:,} {args.data} random vectors, {args.queries} queries, HNSW M={HNSW_M} efConstruction={HNSW_EF_CONSTRUCTION}, "
          f"faiss {faiss.__version__}, {args.threads} thread(s)")
    print()
    print("| dim | efSearch | recall@10 | speed-up vs exact | exact ms/query | HNSW ms/query | build s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for dim in args.dims:
        data = vectors(args.n, dim, args.data, rng)
        queries = vectors(args.queries, dim, args.data, rng)
        table = EmbeddingSet.empty(dim)
        table.vectors = data
        table.ids = table.paths = [str(i) for i in range(args.n)]
        index = Index(table)
        start = time.perf_counter()
        exact = index.search(queries, 10)
        exact_s = time.perf_counter() - start
        truth = [{h.row for h in hits} for hits in exact]
        start = time.perf_counter()
        index.hnsw()
        build_s = time.perf_counter() - start
        for ef in args.ef:
            start = time.perf_counter()
            approx = index.search(queries, 10, approximate=True, ef=ef)
            approx_s = time.perf_counter() - start
            recall = float(np.mean([len(t & {h.row for h in hits}) / 10 for t, hits in zip(truth, approx)]))
            print(f"| {dim} | {ef} | {recall:.3f} | {exact_s / approx_s:.1f}× | {1000 * exact_s / args.queries:.2f} | "
                  f"{1000 * approx_s / args.queries:.2f} | {build_s:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
