"""DSL (dual-softmax re-scoring at inference) and the per-query ranks of modules/metrics.py."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modules.metrics import (compute_metrics, dsl_metrics, dual_softmax, metrics_from_ranks, retrieval_ranks,
                             text_to_video_metrics, video_to_text_metrics)

REPO = Path(__file__).resolve().parents[1]


def loop_dual_softmax(sim, axis, temperature=1.0):
    """Element by element: s[i, j] * exp(s[i, j] / T) / sum over the axis of exp(s / T)."""
    sim = np.asarray(sim, dtype=np.float64)
    out = np.empty_like(sim)
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            line = sim[:, j] if axis == 0 else sim[i, :]
            out[i, j] = sim[i, j] * np.exp(sim[i, j] / temperature) / np.sum(np.exp(line / temperature))
    return out


def loop_rank(row, gt):
    """1 + position of the ground truth in a stable descending sort (ties: lower index first)."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    return order.index(gt)


def test_dual_softmax_matches_elementwise_formula_and_published_forms():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-0.2, 0.5, size=(9, 7))
    logits = 100.0 * cos  # what main.py saves: exp(logit_scale) * cosine with CLIP's logit scale 100
    for axis in (0, 1):
        np.testing.assert_allclose(dual_softmax(logits, axis).numpy(), loop_dual_softmax(logits, axis), rtol=1e-10)
    np.testing.assert_allclose(dual_softmax(logits, 0, temperature=3.0).numpy(),
                               loop_dual_softmax(logits, 0, 3.0), rtol=1e-10)
    # TS2-Net: logits * softmax(logits, axis=0); T-MASS: cos * softmax(100 * cos, axis=0): the same ranking
    e = np.exp(100.0 * cos - (100.0 * cos).max(0))
    t_mass = cos * e / e.sum(0)
    assert np.array_equal(np.argsort(-dual_softmax(logits, 0).numpy(), 1, kind="stable"),
                          np.argsort(-t_mass, 1, kind="stable"))


def test_dsl_corrects_a_hub_video():
    # caption 0 <-> video 0, caption 1 <-> video 1; video 1 is a hub: caption 0 scores it above its own video
    sim = np.array([[9.0, 10.0],
                    [5.0, 11.0]])
    assert compute_metrics(sim)["R1"] == 50.0
    m = dsl_metrics(sim)
    # column softmaxes: video 0 [0.982, 0.018], video 1 [0.269, 0.731] -> row 0: 8.84 vs 2.69 (video 0 first)
    assert m["t2v"]["R1"] == 100.0
    assert m["temperature"] == 1.0 and "every test query" in m["note"]
    # the plain metrics are not changed by computing DSL
    assert compute_metrics(sim)["R1"] == 50.0


def test_dsl_multi_sentence_matches_loop_recomputation():
    rng = np.random.default_rng(1)
    cap_video = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4])
    n_videos = 5
    sim = 20 * rng.normal(size=(cap_video.size, n_videos))
    got = dsl_metrics(sim, cap_video, n_videos, temperature=2.0, return_ranks=True)
    # text-to-video: softmax over all captions of each video column, each caption ranks the videos
    t2v = loop_dual_softmax(sim, 0, 2.0)
    want_t2v = [loop_rank(t2v[c], cap_video[c]) for c in range(cap_video.size)]
    assert got["ranks"]["t2v"].tolist() == want_t2v
    # video-to-text: softmax over the videos of each caption row, then video v scores video u's captions by
    # their maximum
    v2t = loop_dual_softmax(sim, 1, 2.0)
    scores = np.array([[max(v2t[c, v] for c in range(cap_video.size) if cap_video[c] == u) for u in range(n_videos)]
                       for v in range(n_videos)])
    want_v2t = [loop_rank(scores[v], v) for v in range(n_videos)]
    assert got["ranks"]["v2t"].tolist() == want_v2t
    assert got["t2v"] == metrics_from_ranks(want_t2v) and got["v2t"] == metrics_from_ranks(want_v2t)


def test_retrieval_ranks_agree_with_the_metrics():
    rng = np.random.default_rng(2)
    cap_video = np.repeat(np.arange(6), 3)
    sim = rng.normal(size=(18, 6))
    r = retrieval_ranks(sim, cap_video, 6)
    assert metrics_from_ranks(r["t2v"]) == text_to_video_metrics(sim, cap_video)
    assert metrics_from_ranks(r["v2t"]) == video_to_text_metrics(sim, cap_video, 6)
    square = rng.normal(size=(7, 7))
    r = retrieval_ranks(square)
    assert metrics_from_ranks(r["v2t"]) == compute_metrics(square.T)


def test_dsl_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(np.zeros((2, 2)), 0, temperature=0.0)


def test_evaluate_sim_matrix_cli(tmp_path):
    rng = np.random.default_rng(3)
    cap_video = np.repeat(np.arange(5), 2)
    sim = (10 * rng.normal(size=(10, 5))).astype(np.float32)
    np.save(tmp_path / "vatex_sim_matrix.npy", sim)
    np.save(tmp_path / "vatex_caption_video_index.npy", cap_video)
    cmd = [sys.executable, "-m", "analysis.evaluate_sim_matrix", "--sim_matrix", str(tmp_path / "vatex_sim_matrix.npy"),
           "--dsl", "--json", str(tmp_path / "m.json")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "DSL Text-to-Video" in r.stdout and "every test query at once" in r.stdout
    import json
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["t2v"] == pytest.approx(text_to_video_metrics(sim, cap_video))
    assert out["dsl"]["t2v"] == pytest.approx(dsl_metrics(sim, cap_video, 5)["t2v"])
    # a non-square matrix without the caption index is refused with one line
    np.save(tmp_path / "x.npy", sim)
    bad = subprocess.run([sys.executable, "-m", "analysis.evaluate_sim_matrix",
                          "--sim_matrix", str(tmp_path / "x.npy")], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "caption_video_index" in bad.stderr


def test_analysis_tools_on_wrong_files_one_line(tmp_path, capsys):
    """analysis.evaluate_sim_matrix on a checkpoint (a zip), a pickled array, a matrix with NaN or float
    caption indices, and analysis.compare_runs on a binary file: one line naming the file, status 2."""
    import torch

    from analysis.compare_runs import main as compare_main
    from analysis.evaluate_sim_matrix import main as evaluate_main

    sim = np.eye(4, dtype=np.float32)
    np.save(tmp_path / "sim.npy", sim)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "ckpt.pth.tar")
    np.save(tmp_path / "objects.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    with_nan = sim.copy()
    with_nan[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    np.save(tmp_path / "halves.npy", np.array([0.5, 1, 2, 3]))
    cases = [
        (evaluate_main, ["--sim_matrix", str(tmp_path / "ckpt.pth.tar")], "ckpt.pth.tar: not a .npy array"),
        (evaluate_main, ["--sim_matrix", str(tmp_path / "objects.npy")], "objects.npy: not a readable .npy array"),
        (evaluate_main, ["--sim_matrix", str(tmp_path / "nan.npy")], "nan.npy row 2 column 1 is nan"),
        (evaluate_main, ["--sim_matrix", str(tmp_path / "sim.npy"), "--caption_video_index",
                         str(tmp_path / "halves.npy")], "halves.npy must hold video numbers"),
        (compare_main, [str(tmp_path / "sim.npy"), str(tmp_path / "sim.npy")], "sim.npy: not a per-query ranks file"),
    ]
    for main, argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert evaluate_main(["--sim_matrix", str(tmp_path / "sim.npy")]) == 0
