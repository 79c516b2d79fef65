import numpy as np
import pytest
import torch

from modules.metrics import (compute_metrics, compute_ranks, group_max_video_to_text, metrics_from_ranks,
                             text_to_video_metrics, video_to_text_metrics)


def test_known_ranks_without_ties():
    sim = np.array([[0.9, 0.1, 0.2, 0.0],     # gt best -> rank 0
                    [0.8, 0.5, 0.9, 0.1],     # two above -> rank 2
                    [0.1, 0.2, 0.3, 0.0],     # rank 0
                    [0.5, 0.6, 0.7, 0.4]])    # three above -> rank 3
    assert compute_ranks(sim).tolist() == [0, 2, 0, 3]
    m = compute_metrics(sim)
    assert m["R1"] == 50.0 and m["R5"] == 100.0 and m["R10"] == 100.0
    assert m["MR"] == 2.0 and m["MedianR"] == 2.0  # 1-based ranks 1,3,1,4 -> median 2
    assert m["MeanR"] == pytest.approx((1 + 3 + 1 + 4) / 4)
    assert m["num_queries"] == 4


def test_ties_resolved_by_column_index_one_rank_per_query():
    sim = np.array([[1.0, 1.0, 0.0],    # gt col 0 ties with col 1 (after it) -> rank 0
                    [1.0, 1.0, 0.0],    # gt col 1 ties with col 0 (before it) -> rank 1
                    [0.5, 0.5, 0.5]])   # all tie: cols 0,1 before gt col 2 -> rank 2
    assert compute_ranks(sim).tolist() == [0, 1, 2]
    m = compute_metrics(sim)
    assert m["num_queries"] == 3
    assert m["R1"] == pytest.approx(100 / 3)


def test_constant_matrix_is_chance_level():
    n = 100
    m = compute_metrics(np.zeros((n, n)))
    assert m["R1"] == pytest.approx(1.0)
    assert m["R10"] == pytest.approx(10.0)
    assert m["MeanR"] == pytest.approx((n + 1) / 2)


def test_nan_counts_as_minus_inf_and_torch_input():
    sim = torch.tensor([[float("nan"), 0.0], [0.3, 0.2]])
    assert compute_ranks(sim).tolist() == [1, 1]


def test_chunking_does_not_change_ranks():
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 5, size=(37, 37)).astype(np.float32)  # many ties
    full = compute_ranks(sim, row_chunk=1000)
    chunked = compute_ranks(sim, row_chunk=4)
    assert np.array_equal(full, chunked)
    # same as the position in a stable descending sort
    order = np.argsort(-sim, axis=1, kind="stable")
    expected = np.array([int(np.nonzero(order[i] == i)[0][0]) for i in range(37)])
    assert np.array_equal(full, expected)


def test_matches_published_function_when_no_ties():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(50, 50))
    sx = np.sort(-sim, axis=1)
    d = np.diag(-sim)[:, None]
    published_ranks = np.where(sx - d == 0)[1]
    assert np.array_equal(compute_ranks(sim), published_ranks)


def test_multi_sentence_text_to_video_and_video_to_text():
    # 3 videos; captions 0,1 -> video 0, caption 2 -> video 1, captions 3,4 -> video 2
    cap_video = np.array([0, 0, 1, 2, 2])
    sim = np.array([[0.9, 0.1, 0.0],
                    [0.2, 0.3, 0.1],   # caption 1 ranks its video 2nd
                    [0.0, 0.8, 0.1],
                    [0.0, 0.1, 0.7],
                    [0.6, 0.1, 0.5]])  # caption 4 ranks its video 2nd
    t2v = text_to_video_metrics(sim, cap_video)
    assert t2v["num_queries"] == 5
    assert t2v["R1"] == pytest.approx(60.0)
    v2t_scores = group_max_video_to_text(sim, cap_video, 3)
    # [v, u] = max over captions of u of sim[c, v]
    expected = np.array([[0.9, 0.0, 0.6],
                         [0.3, 0.8, 0.1],
                         [0.1, 0.1, 0.7]])
    np.testing.assert_allclose(v2t_scores.numpy(), expected, rtol=0, atol=1e-7)
    v2t = video_to_text_metrics(sim, cap_video, 3)
    assert v2t["num_queries"] == 3 and v2t["R1"] == 100.0


def test_single_sentence_video_to_text_is_transpose():
    rng = np.random.default_rng(2)
    sim = rng.normal(size=(20, 20))
    assert video_to_text_metrics(sim) == compute_metrics(sim.T)
    assert video_to_text_metrics(sim, np.arange(20), 20) == compute_metrics(sim.T)


def test_bad_inputs():
    with pytest.raises(ValueError):
        compute_ranks(np.zeros((3, 2)))
    with pytest.raises(ValueError):
        compute_ranks(np.zeros((2, 2)), gt_index=[0, 5])
    with pytest.raises(ValueError):
        metrics_from_ranks([])
