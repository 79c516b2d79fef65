"""Retrieval metrics shared by main.py and search_for_best_r1_with_qb_norm.py.

Every query gets exactly one rank.  The rank (0-based) of the ground-truth candidate g of a
query row s is

    rank = #{j : s[j] > s[g]}  +  #{j < g : s[j] == s[g]}

i.e. the position of g in a *stable* descending sort of the row: candidates that tie with the
ground truth are placed ahead of it when their column index is smaller and behind it otherwise.
With no ties this is the usual rank; a constant matrix therefore scores at chance level
(query i gets rank i) instead of 100 % (optimistic rule) or 0 % (pessimistic rule).  NaN scores are
treated as -inf.  (The published function instead counts a query once per tied candidate, so
with ties it averages over more "queries" than exist.)

R@k are percentages, MR / MedianR is the median of the 1-based ranks, MeanR their mean.

DSL (dual-softmax re-scoring at inference, opt-in; :func:`dual_softmax`, :func:`dsl_metrics`) is the
re-scoring TS2-Net and T-MASS report: with S the (captions x videos) logit matrix, S = exp(logit_scale) * cos
(= 100 * cos for CLIP's frozen logit scale),

    DSL_t2v = S * softmax(S / T, dim=captions)        T = 1  (the temperature)

i.e. each score is weighted by how strongly that caption, among ALL test captions, claims the video.
TS2-Net computes S * softmax(S, axis=0) on this logit matrix; T-MASS S_cos * softmax(100 * S_cos, axis=0) on
the cosine matrix: the same ranking.  A ranking under DSL therefore uses every test query at once (it is
a transductive score, reported next to the plain metrics, never instead of them).  Multi-sentence test sets:
the softmax runs over all captions of the matrix, as TS2-Net computes it before grouping.  For video-to-text
the dual is taken along the other axis, S * softmax(S / T, dim=videos), before the per-video maximum over
each video's captions (TS2-Net re-uses the text-to-video matrix for video-to-text, which for positive
logits leaves each video's ranking of captions unchanged).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["compute_ranks", "metrics_from_ranks", "compute_metrics", "group_max_video_to_text",
           "text_to_video_metrics", "video_to_text_metrics", "format_metrics", "retrieval_ranks",
           "dual_softmax", "dsl_metrics", "DSL_TEMPERATURE", "DSL_LABEL"]

DSL_TEMPERATURE = 1.0
DSL_LABEL = "DSL (re-scored with every test query at once)"

_ROW_CHUNK = 1024


def _as_tensor(sim) -> torch.Tensor:
    if isinstance(sim, np.ndarray):
        t = torch.from_numpy(sim)
    elif isinstance(sim, torch.Tensor):
        t = sim.detach().cpu()
    else:
        t = torch.as_tensor(np.asarray(sim))
    if not t.is_floating_point():
        t = t.double()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def compute_ranks(sim, gt_index=None, row_chunk: int = _ROW_CHUNK) -> np.ndarray:
    """0-based rank of each query's ground-truth candidate (see the module docstring for ties).

    sim: (num_queries, num_candidates) array or tensor.  gt_index: (num_queries,) candidate index
    of each query's ground truth; default: the diagonal (query i <-> candidate i).  Rows are
    processed in chunks so that large matrices need little extra memory.
    """
    s = _as_tensor(sim)
    if s.dim() != 2:
        raise ValueError(f"similarity matrix must be 2-D, got shape {tuple(s.shape)}")
    q, c = s.shape
    if gt_index is None:
        if q > c:
            raise ValueError(f"diagonal ground truth needs num_queries <= num_candidates, got {q} x {c}")
        gt = torch.arange(q)
    else:
        gt = torch.as_tensor(np.asarray(gt_index), dtype=torch.long).reshape(-1)
        if gt.numel() != q:
            raise ValueError(f"gt_index has {gt.numel()} entries for {q} queries")
        if q and (int(gt.min()) < 0 or int(gt.max()) >= c):
            raise ValueError("gt_index out of range")
    cols = torch.arange(c)
    ranks = torch.empty(q, dtype=torch.long)
    for start in range(0, q, row_chunk):
        block = s[start:start + row_chunk]
        block = torch.nan_to_num(block, nan=float("-inf"))
        g = gt[start:start + row_chunk]
        target = block.gather(1, g[:, None])
        higher = (block > target).sum(1)
        tied_before = ((block == target) & (cols[None, :] < g[:, None])).sum(1)
        ranks[start:start + row_chunk] = higher + tied_before
    return ranks.numpy()


def metrics_from_ranks(ranks) -> dict:
    r = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if r.size == 0:
        raise ValueError("no queries to evaluate")
    n = float(r.size)
    m = {
        "R1": float(np.sum(r < 1)) * 100.0 / n,
        "R5": float(np.sum(r < 5)) * 100.0 / n,
        "R10": float(np.sum(r < 10)) * 100.0 / n,
        "MR": float(np.median(r + 1)),
        "MeanR": float(np.mean(r + 1)),
    }
    m["MedianR"] = m["MR"]
    m["Rsum"] = m["R1"] + m["R5"] + m["R10"]
    m["num_queries"] = int(r.size)
    return m


def compute_metrics(sim) -> dict:
    """Metrics of a (queries x candidates) matrix whose ground truth is on the diagonal."""
    return metrics_from_ranks(compute_ranks(sim))


def group_max_video_to_text(sim, caption_video_index, num_videos: int) -> torch.Tensor:
    """(num_captions, num_videos) text-video scores -> (num_videos, num_videos) video-to-text scores.

    Entry [v, u] is the best score of video v against any caption of video u (the published
    multi-sentence video-to-text protocol); videos without captions get -inf columns.
    """
    s = _as_tensor(sim)
    s = torch.nan_to_num(s if s.dtype == torch.float64 else s.float(), nan=float("-inf"))
    idx = torch.as_tensor(np.asarray(caption_video_index), dtype=torch.long).reshape(-1)
    out = torch.full((num_videos, s.shape[1]), float("-inf"), dtype=s.dtype)
    out.scatter_reduce_(0, idx[:, None].expand_as(s), s, reduce="amax", include_self=True)
    return out.T.contiguous()


def text_to_video_metrics(sim, caption_video_index=None) -> dict:
    """Every caption is a query ranked against all videos."""
    return metrics_from_ranks(compute_ranks(sim, caption_video_index))


def video_to_text_metrics(sim, caption_video_index=None, num_videos: int | None = None) -> dict:
    """Every video is a query; with several captions per video its score for a video u is the
    maximum over u's captions (the published protocol).  With one caption per video
    (caption i <-> video i) this is compute_metrics(sim.T)."""
    return compute_metrics(_video_to_text_scores(sim, caption_video_index, num_videos))


def _video_to_text_scores(sim, caption_video_index, num_videos):
    """(num_videos, num_videos) video-to-text scores ([v, u] = video v against video u's captions)."""
    s = _as_tensor(sim)
    if caption_video_index is None:
        return s.T
    n_v = int(num_videos if num_videos is not None else s.shape[1])
    return group_max_video_to_text(s, caption_video_index, n_v)


def retrieval_ranks(sim, caption_video_index=None, num_videos: int | None = None) -> dict:
    """0-based rank of the ground truth for every query: ``t2v`` (num_captions,) and ``v2t`` (num_videos,).

    The per-query form of :func:`text_to_video_metrics` / :func:`video_to_text_metrics` (same protocol,
    same ties): ``metrics_from_ranks(ranks["t2v"])`` equals ``text_to_video_metrics(sim, ...)``.
    """
    return {"t2v": compute_ranks(sim, caption_video_index),
            "v2t": compute_ranks(_video_to_text_scores(sim, caption_video_index, num_videos))}


def dual_softmax(sim, dim: int, temperature: float = DSL_TEMPERATURE) -> torch.Tensor:
    """sim * softmax(sim / temperature, dim) in float64 (see the module docstring).

    ``dim=0`` (over the captions) re-scores for text-to-video, ``dim=1`` (over the videos) for video-to-text.
    """
    if temperature <= 0:
        raise ValueError(f"the DSL temperature must be > 0, got {temperature}")
    s = _as_tensor(sim).double()
    prior = torch.softmax(torch.nan_to_num(s, nan=float("-inf")) / temperature, dim=dim)
    return s * prior


def dsl_metrics(sim, caption_video_index=None, num_videos: int | None = None,
                temperature: float = DSL_TEMPERATURE, return_ranks: bool = False) -> dict:
    """Text-to-video and video-to-text metrics of the DSL re-scored matrix: dict(t2v, v2t, temperature).

    sim: (num_captions, num_videos) logits; caption_video_index as in :func:`text_to_video_metrics`.
    With ``return_ranks`` the per-query ranks are included as ``ranks`` (see :func:`retrieval_ranks`).
    """
    t2v_ranks = compute_ranks(dual_softmax(sim, 0, temperature), caption_video_index)
    v2t_scores = _video_to_text_scores(dual_softmax(sim, 1, temperature), caption_video_index, num_videos)
    v2t_ranks = compute_ranks(v2t_scores)
    out = {"t2v": metrics_from_ranks(t2v_ranks), "v2t": metrics_from_ranks(v2t_ranks),
           "temperature": float(temperature), "note": DSL_LABEL}
    if return_ranks:
        out["ranks"] = {"t2v": t2v_ranks, "v2t": v2t_ranks}
    return out


def format_metrics(m: dict, prefix: str = "") -> str:
    return (f"{prefix}R@1: {m['R1']:.1f} - R@5: {m['R5']:.1f} - R@10: {m['R10']:.1f} - "
            f"Median R: {m['MR']:.1f} - Mean R: {m['MeanR']:.1f}")
