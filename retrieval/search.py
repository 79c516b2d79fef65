"""Top-k inner-product search over L2-normalised features: exact in bounded memory, or with faiss.

* :func:`exact_topk` streams the candidates in chunks and keeps a running top-k, so memory is
  O(queries x chunk + queries x k) whatever the index size (the features themselves can stream from
  disk, shard by shard).
* :class:`FaissSearcher` (optional, ``pip install faiss-cpu``): ``flat`` is exact inner product;
  ``ivf`` (inverted lists) and ``hnsw`` (graph) are approximate, for millions of videos. Their recall
  against exact search is measured with :func:`recall_at_k`.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

BACKENDS = ("auto", "exact", "approximate", "faiss", "faiss-ivf", "faiss-hnsw")
APPROXIMATE = {"faiss-ivf": "ivf", "faiss-hnsw": "hnsw"}


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _merge_topk(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.cat([best_s, s], dim=1)
    rows = torch.cat([best_i, i], dim=1)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values, rows.gather(1, top.indices)


@torch.no_grad()
def exact_topk(queries: torch.Tensor, chunks: Iterable[torch.Tensor], k: int,
               chunk_rows: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries`` (Q, D) against the concatenation of ``chunks`` (each (n, D)).

    Returns scores (Q, k') float32 and row numbers (Q, k') int64, best first, k' = min(k, rows seen).
    A chunk longer than ``chunk_rows`` is cut, so at most Q x chunk_rows scores exist at a time.
    """
    q = queries.float()
    best_s = q.new_empty(q.shape[0], 0)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    offset = 0
    for chunk in chunks:
        chunk = torch.as_tensor(chunk)
        for start in range(0, chunk.shape[0], chunk_rows):
            part = chunk[start:start + chunk_rows].to(q.device, torch.float32)
            s = q @ part.t()                                                 # (Q, n)
            top = s.topk(min(k, s.shape[1]), dim=1)
            best_s, best_i = _merge_topk(best_s, best_i, top.values, top.indices + offset + start, k)
        offset += chunk.shape[0]
    return best_s, best_i


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |approx top-k  intersect  exact top-k| / k."""
    k = exact_rows.shape[1]
    if k == 0:
        return 1.0
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits)) / k


class FaissSearcher:
    """A faiss inner-product index over (N, D) float32 features: kind flat | ivf | hnsw."""

    def __init__(self, index, kind: str, params: dict):
        self.index, self.kind, self.params = index, kind, params

    @classmethod
    def build(cls, features: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int | None = None,
              hnsw_m: int = 32, ef_search: int = 128, seed: int = 0) -> "FaissSearcher":
        import faiss

        x = np.ascontiguousarray(features, dtype=np.float32)
        n, d = x.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
            params = {}
        elif kind == "ivf":
            nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))
            nprobe = nprobe or max(1, nlist // 16)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            train = x if n <= 64 * nlist else x[rng.choice(n, 64 * nlist, replace=False)]  # 64 points per centroid
            index.train(train)
            index.nprobe = nprobe
            params = {"nlist": nlist, "nprobe": nprobe}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
            params = {"M": hnsw_m, "efSearch": ef_search}
        else:
            raise ValueError(f"unknown faiss index kind {kind!r} (flat, ivf, hnsw)")
        index.add(x)
        return cls(index, kind, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, rows

    def save(self, path: str) -> None:
        import faiss

        faiss.write_index(self.index, path)

    @classmethod
    def load(cls, path: str, kind: str, params: dict) -> "FaissSearcher":
        import faiss

        index = faiss.read_index(path)
        if kind == "ivf":
            index.nprobe = params["nprobe"]
        elif kind == "hnsw":
            index.hnsw.efSearch = params["efSearch"]
        return cls(index, kind, params)
