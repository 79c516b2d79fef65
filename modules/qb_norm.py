"""Querybank normalisation (QB-norm, Bogolin et al. 2022) as computed by the published DGL search script.

For one direction (rows = queries, columns = gallery items):

1. The query bank is a (num_bank_queries, num_gallery) similarity matrix ``train_test``
   (training queries against the test gallery).  The *activated* gallery items are those that
   appear in the top-k of at least ``theta`` bank queries.
2. Both matrices are mapped through exp(beta * s); the normaliser of gallery item j is the column
   sum of the exponentiated bank matrix.
3. A test query whose top-1 gallery item (of exp(beta * s)) is activated gets its whole row replaced
   by exp(beta * s) / normaliser; every other row keeps its *raw* scores (as in the published
   script; rows are only ever ranked within themselves, so the mixed scales do not matter).

Choosing beta: the published search (:func:`search_best_beta`) keeps the beta with the best *test* R@1, so
its number includes a selection on the test labels. :func:`cross_validate_beta` chooses beta from the
query bank alone: a (train captions x train videos) matrix with the training ground truth is split by
video into folds; each fold's videos are a gallery, their captions the queries, and the captions of the
other folds' videos the bank (as at test time, the bank never describes a gallery video); the beta with
the best pooled R@1 over the folds is then applied once to the test matrix.

Ties: the top-k / top-1 items are taken from a stable descending sort (lowest column index first
among equal scores); the published script uses numpy's default (unstable) sort, so the two can
differ only where scores tie exactly.
"""
from __future__ import annotations

import numpy as np

from modules.metrics import compute_metrics, compute_ranks, format_metrics

__all__ = ["get_retrieved_videos", "get_index_to_normalize", "qb_norm", "beta_values", "search_best_beta",
           "bank_folds", "cross_validate_beta", "bank_overlap", "rows_of_queries"]


def _topk_indices(sims: np.ndarray, k: int) -> np.ndarray:
    k = max(0, min(int(k), sims.shape[1]))
    if k == 0:
        return np.empty((sims.shape[0], 0), dtype=np.int64)
    if k == 1:
        return np.argmax(np.nan_to_num(sims, nan=-np.inf), axis=1)[:, None]
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def get_retrieved_videos(sims: np.ndarray, k: int, theta: float) -> np.ndarray:
    """Gallery items found in the top-k of at least theta query-bank rows."""
    topk = _topk_indices(np.asarray(sims), k).reshape(-1)
    items, counts = np.unique(topk, return_counts=True)
    return items[counts >= theta]


def get_index_to_normalize(sims: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Row indices whose top-1 gallery item is among ``items``."""
    top1 = _topk_indices(np.asarray(sims), 1)[:, 0]
    return np.nonzero(np.isin(top1, items))[0]


def qb_norm(train_test: np.ndarray, test_test: np.ndarray, k: int, beta: float, theta: float,
            retrieved: np.ndarray | None = None) -> np.ndarray:
    """Normalised copy of ``test_test`` (queries x gallery) using the bank ``train_test``.

    ``retrieved`` (the activated gallery items) may be passed in when it was computed already; it
    depends only on (train_test, k, theta), not on beta.
    """
    train_test = np.asarray(train_test)
    out = np.array(test_test, copy=True)
    # a Python float: a float32 matrix stays float32 under NumPy 2 too, as it did for the published script
    # (NumPy 1.x), instead of being promoted to float64 by a np.float64 beta
    beta = float(beta)
    if retrieved is None:
        retrieved = get_retrieved_videos(train_test, k, theta)
    train_exp = np.exp(train_test * beta)
    test_exp = np.exp(out * beta)
    normalizing_sum = np.sum(train_exp, axis=0)
    rows = get_index_to_normalize(test_exp, retrieved)
    out[rows, :] = np.divide(test_exp[rows, :], normalizing_sum)
    return out


def beta_values(beta_min: float, beta_max: float, beta_step: float) -> np.ndarray:
    """The betas the published script tries: np.arange(min, max + step, step)."""
    return np.arange(beta_min, beta_max + beta_step, beta_step)


def search_best_beta(train_test_t2v: np.ndarray, train_test_v2t: np.ndarray, sim_matrix: np.ndarray,
                     betas, t2v_k: int = 1, t2v_theta: float = 3, v2t_k: int = 1, v2t_theta: float = 5,
                     log=print):
    """Try every beta for both directions; keep the first beta with the best text-to-video R@1.

    train_test_t2v: (bank text queries, test videos); train_test_v2t: (test texts, bank videos),
    transposed here as in the published script; sim_matrix: (test texts, test videos).
    Returns (best_beta, best_r1, history) where history is a list of dicts per beta.
    """
    sim_matrix = np.asarray(sim_matrix)
    bank_v2t = np.asarray(train_test_v2t).T
    sim_t = sim_matrix.T
    retrieved_t2v = get_retrieved_videos(train_test_t2v, t2v_k, t2v_theta)
    retrieved_v2t = get_retrieved_videos(bank_v2t, v2t_k, v2t_theta)
    best_beta, best_r1, history = None, 0.0, []
    for beta in betas:
        t2v = qb_norm(train_test_t2v, sim_matrix, t2v_k, beta, t2v_theta, retrieved=retrieved_t2v)
        v2t = qb_norm(bank_v2t, sim_t, v2t_k, beta, v2t_theta, retrieved=retrieved_v2t)
        tv, vt = compute_metrics(t2v), compute_metrics(v2t)
        log("Text-to-Video: " + format_metrics(tv))
        log("Video-to-Text: " + format_metrics(vt, prefix="V2T "))
        if tv["R1"] > best_r1:
            best_r1, best_beta = tv["R1"], float(beta)
        log(f"Beta: {float(beta):.4f}, curr R@1: {tv['R1']}")
        history.append({"beta": float(beta), "t2v": tv, "v2t": vt})
    return best_beta, best_r1, history


def bank_folds(caption_video, num_folds: int = 5, gallery_size: int | None = None, seed: int = 0) -> list[dict]:
    """Video-disjoint folds of a (train captions x train videos) matrix for :func:`cross_validate_beta`.

    caption_video: (num_captions,) column of each caption's video, -1 when its video is not a column.
    Each fold is dict(gallery (columns), queries (rows whose video is in the gallery), gt (each query's
    position in the gallery), bank (rows whose video is not in the fold)).  The columns are shuffled with
    ``seed`` and split into ``num_folds`` parts; a part larger than ``gallery_size`` keeps its first
    ``gallery_size`` videos as the gallery (so the gallery can match the test set's size).
    """
    caption_video = np.asarray(caption_video, dtype=np.int64).reshape(-1)
    videos = np.unique(caption_video[caption_video >= 0])
    if num_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {num_folds}")
    if videos.size < num_folds:
        raise ValueError(f"the query bank has captions of {videos.size} videos, fewer than {num_folds} folds")
    shuffled = np.random.default_rng(seed).permutation(videos)
    folds = []
    for part in np.array_split(shuffled, num_folds):
        gallery = np.sort(part[:gallery_size] if gallery_size else part)
        queries = np.nonzero(np.isin(caption_video, gallery))[0]
        bank = np.nonzero(~np.isin(caption_video, part))[0]
        if queries.size == 0 or bank.size == 0:
            raise ValueError("a cross-validation fold has no queries or no bank; use fewer folds")
        folds.append({"gallery": gallery, "queries": queries, "bank": bank,
                      "gt": np.searchsorted(gallery, caption_video[queries])})
    return folds


def cross_validate_beta(train_train: np.ndarray, caption_video, betas, k: int = 1, theta: float = 3,
                        num_folds: int = 5, gallery_size: int | None = None, seed: int = 0, log=print):
    """Choose the text-to-video beta on the query bank alone (no test labels); see the module docstring.

    train_train: (train captions, train videos) similarities; caption_video: each caption's column (-1: none).
    Returns (best_beta, best_r1, history) with the first beta of the best pooled cross-validated R@1 (the
    tie rule of :func:`search_best_beta`) and history = [{beta, R1, per_fold_R1}].
    """
    train_train = np.asarray(train_train)
    folds = bank_folds(caption_video, num_folds, gallery_size, seed)
    prepared = []
    for f in folds:
        bank = train_train[np.ix_(f["bank"], f["gallery"])]
        queries = train_train[np.ix_(f["queries"], f["gallery"])]
        prepared.append((bank, queries, f["gt"], get_retrieved_videos(bank, k, theta)))
    log(f"cross-validation: {num_folds} video-disjoint folds, gallery {[len(f['gallery']) for f in folds]} videos, "
        f"{[len(f['queries']) for f in folds]} queries, bank {[len(f['bank']) for f in folds]} captions")
    total = sum(q.shape[0] for _, q, _, _ in prepared)
    plain = sum(int(np.sum(compute_ranks(q, gt) == 0)) for _, q, gt, _ in prepared)
    log(f"Without QB-norm, cross-validated R@1: {100.0 * plain / total:.3f}")
    best_beta, best_r1, history = None, -1.0, []
    for beta in betas:
        hits = [int(np.sum(compute_ranks(qb_norm(bank, queries, k, beta, theta, retrieved=retrieved), gt) == 0))
                for bank, queries, gt, retrieved in prepared]
        r1 = 100.0 * sum(hits) / total
        per_fold = [100.0 * h / q.shape[0] for h, (_, q, _, _) in zip(hits, prepared)]
        log(f"Beta: {float(beta):.4f}, cross-validated R@1: {r1:.3f}")
        if r1 > best_r1:
            best_r1, best_beta = r1, float(beta)
        history.append({"beta": float(beta), "R1": r1, "per_fold_R1": per_fold})
    return best_beta, best_r1, history


def bank_overlap(bank_keys, query_keys) -> dict:
    """Which query-bank rows are evaluated queries. ``bank_keys`` / ``query_keys``: one hashable per row that
    is equal for two rows the model cannot tell apart (texts: :func:`modules.tokenizer.text_as_read`).

    Returns dict(shared: [(bank row, query row)] for every bank row that is an evaluated query, in bank
    order; every_query: True when each evaluated query is in the bank, so that QB-norm would normalise
    every query with itself).
    """
    first_query: dict = {}
    for row, key in enumerate(query_keys):
        first_query.setdefault(key, row)
    shared = [(row, first_query[key]) for row, key in enumerate(bank_keys) if key in first_query]
    found = {first_query_row for _, first_query_row in shared}
    return {"shared": shared, "every_query": bool(first_query) and len(found) == len(first_query)}


def rows_of_queries(bank: np.ndarray, queries: np.ndarray, tolerance: float = 1e-3, chunk: int = 4096) -> np.ndarray:
    """For each row of a bank matrix (bank queries x gallery), the first row of ``queries`` (queries x the
    same gallery) with the same scores (root mean square difference under ``tolerance``, in the matrices'
    units), else -1: a bank query scoring every gallery item as an evaluated query does is that query (a
    query matrix passed as the bank, or the same texts encoded twice)."""
    bank = np.asarray(bank, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.float64)
    found = np.full(bank.shape[0], -1, dtype=np.int64)
    if bank.shape[1] != queries.shape[1] or not queries.size:
        return found
    q_norms = np.sum(queries ** 2, axis=1)
    limit = tolerance ** 2 * bank.shape[1]
    for start in range(0, bank.shape[0], chunk):
        part = bank[start:start + chunk]
        distance = np.sum(part ** 2, axis=1)[:, None] + q_norms[None, :] - 2.0 * part @ queries.T
        nearest = np.argmin(distance, axis=1)
        close = distance[np.arange(len(part)), nearest] <= limit
        found[start:start + chunk] = np.where(close, nearest, -1)
    return found
