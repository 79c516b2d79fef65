"""Search latency and memory over N random 512-d video features, per backend, with ratios.

Backends: ``exact`` (the built-in chunked exact search, the baseline), ``faiss`` (faiss IndexFlatIP,
exact), ``approximate`` (the search ``query`` and ``serve`` use from 200,000 entries:
retrieval.approximate, its settings chosen while it is built; here over features in memory),
``faiss-ivf`` and ``faiss-hnsw`` (approximate; recall@k against exact is reported). The faiss ones are
skipped when faiss is not installed.

The features are random unit vectors; the queries are indexed vectors plus noise (cosine ~0.7 to
their source), a stand-in for text queries near their videos. Random data has no cluster structure,
so approximate recall here is a pessimistic figure.

    python benchmarks/bench_search.py                       # 10k, 100k and 1M videos
    python benchmarks/bench_search.py --sizes 10000 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_model import peak_rss_mb, reset_peak_rss  # noqa: E402
from retrieval.search import FaissSearcher, exact_topk, faiss_available, recall_at_k  # noqa: E402
from runtime.errors import finite_float  # noqa: E402


def unit_rows(rng: np.random.Generator, n: int, d: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        out[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed(fn, rounds: int) -> tuple[float, object]:
    fn()  # warm-up: first-call allocations and thread start-up are not search time
    times, result = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), result


def bench_size(n: int, args, rng) -> list[dict]:
    feats = unit_rows(rng, n, args.dim)
    src = rng.choice(n, args.queries, replace=False)
    noise = unit_rows(rng, args.queries, args.dim)
    queries = feats[src] + args.noise * noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    device = torch.device(args.device)
    feats_t = torch.from_numpy(feats).to(device)

    rows = []
    exact_rows = None
    for backend in args.backends:
        if backend.startswith("faiss") and not faiss_available():
            print(f"  {backend}: skipped (faiss not installed)")
            continue
        base_rss = reset_peak_rss()
        t0 = time.perf_counter()
        if backend == "exact":
            searcher = None
            index_mib = feats.nbytes / 2 ** 20

            def search(q, k=args.k):
                scores, found = exact_topk(torch.from_numpy(q).to(device), [feats_t], k, chunk_rows=args.chunk_rows)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return scores.cpu(), found.cpu()
        elif backend == "approximate":
            from retrieval.approximate import MemoryRows, build

            searcher = build(MemoryRows(feats), lambda: (feats[s:s + 65536] for s in range(0, n, 65536)), "bench")
            import faiss
            index_mib = len(faiss.serialize_index(searcher.index)) / 2 ** 20

            def search(q, k=args.k, s=searcher):
                return s.search(q, k)
        else:
            kind = {"faiss": "flat", "faiss-ivf": "ivf", "faiss-hnsw": "hnsw"}[backend]
            searcher = FaissSearcher.build(feats, kind)
            import faiss
            index_mib = len(faiss.serialize_index(searcher.index)) / 2 ** 20

            def search(q, k=args.k, s=searcher):
                return s.search(q, k)
        build_s = time.perf_counter() - t0
        single_s, _ = timed(lambda: search(queries[:1]), args.rounds)
        batch_s, result = timed(lambda: search(queries), args.rounds)
        peak = peak_rss_mb() - base_rss
        found = np.asarray(result[1])
        if backend == "exact":
            exact_rows = found
        recall = recall_at_k(found, exact_rows) if exact_rows is not None else float("nan")
        rows.append({"n": n, "backend": backend, "build_s": build_s, "single_ms": 1e3 * single_s,
                     "batch_ms_per_query": 1e3 * batch_s / len(queries), "index_mib": index_mib,
                     "peak_rss_growth_mib": peak, "recall": recall,
                     "params": dict(searcher.params) if searcher is not None else {"chunk_rows": args.chunk_rows}})
        del searcher
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=100, help="queries per batch")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--noise", type=finite_float, default=1.0, help="query = indexed vector + noise * unit vector")
    p.add_argument("--chunk_rows", type=int, default=65536, help="exact search chunk (bounded memory)")
    p.add_argument("--backends", nargs="+", default=["exact", "faiss", "approximate", "faiss-ivf", "faiss-hnsw"],
                   choices=["exact", "faiss", "approximate", "faiss-ivf", "faiss-hnsw"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the built-in exact search runs (faiss-cpu always runs on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.backends[0] != "exact":
        args.backends = ["exact"] + [b for b in args.backends if b != "exact"]  # the baseline comes first
    threads = torch.get_num_threads()
    if faiss_available():
        import faiss
        threads = f"torch {threads}, faiss {faiss.omp_get_max_threads()}"
    print(f"search benchmark: {args.dim}-d unit features, {args.queries} queries, top-{args.k}, "
          f"median of {args.rounds} rounds, exact search on {args.device}, threads: {threads}")
    rng = np.random.default_rng(args.seed)
    header = (f"{'videos':>9} {'backend':<11} {'build s':>8} {'1 query ms':>11} {'x exact':>8} "
              f"{'batch ms/q':>11} {'x exact':>8} {'index MiB':>10} {'peak +MiB':>10} {'recall@k':>9}  params")
    print(header)
    for n in args.sizes:
        rows = bench_size(n, args, rng)
        base = rows[0]
        for r in rows:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            print(f"{r['n']:>9} {r['backend']:<11} {r['build_s']:8.2f} {r['single_ms']:11.3f} "
                  f"{base['single_ms'] / r['single_ms']:7.2f}x {r['batch_ms_per_query']:11.4f} "
                  f"{base['batch_ms_per_query'] / r['batch_ms_per_query']:7.2f}x {r['index_mib']:10.1f} "
                  f"{r['peak_rss_growth_mib']:10.1f} {r['recall']:9.3f}  {params}", flush=True)
    print("x exact: speed-up over the built-in exact search in the same run (higher is faster); "
          "peak +MiB: peak resident memory growth while building and querying")
    return 0


if __name__ == "__main__":
    sys.exit(main())
