import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modules.metrics import compute_metrics
from modules.qb_norm import beta_values, get_retrieved_videos, qb_norm, search_best_beta

REPO = Path(__file__).resolve().parents[1]


def reference_qb_norm(train_test, test_test, k, beta, theta):
    """Direct, loop-based re-computation of the published procedure."""
    train_test = np.array(train_test, copy=True)
    test_test = np.array(test_test, copy=True)
    counts = {}
    for row in train_test:
        for j in np.argsort(-row, kind="stable")[:k]:
            counts[int(j)] = counts.get(int(j), 0) + 1
    activated = {j for j, c in counts.items() if c >= theta}
    train_exp = np.exp(train_test * beta)
    test_exp = np.exp(test_test * beta)
    norm = train_exp.sum(axis=0)
    out = test_test.copy()
    for i in range(test_test.shape[0]):
        top1 = int(np.argsort(-test_exp[i], kind="stable")[0])
        if top1 in activated:
            out[i] = test_exp[i] / norm
    return out


@pytest.mark.parametrize("k,theta", [(1, 1), (1, 2), (3, 2), (2, 5)])
def test_qb_norm_matches_direct_recomputation(k, theta):
    rng = np.random.default_rng(k * 10 + theta)
    train_test = rng.normal(size=(40, 12)).astype(np.float32) * 3
    test_test = rng.normal(size=(12, 12)).astype(np.float32) * 3
    for beta in (0.5, 0.87, 1.0):
        ours = qb_norm(train_test, test_test, k, beta, theta)
        ref = reference_qb_norm(train_test, test_test, k, beta, theta)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)
        assert compute_metrics(ours) == compute_metrics(ref)


def test_qb_norm_does_not_modify_inputs_and_keeps_unselected_rows_raw():
    rng = np.random.default_rng(0)
    train_test = rng.normal(size=(30, 8))
    test_test = rng.normal(size=(8, 8))
    a, b = train_test.copy(), test_test.copy()
    out = qb_norm(train_test, test_test, 1, 0.8, 1000)  # theta too high: nothing activated
    np.testing.assert_array_equal(train_test, a)
    np.testing.assert_array_equal(test_test, b)
    np.testing.assert_array_equal(out, test_test)


def test_retrieved_videos():
    sims = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.9]])
    assert get_retrieved_videos(sims, 1, 2).tolist() == [0]
    assert get_retrieved_videos(sims, 1, 1).tolist() == [0, 2]


def test_beta_values_like_published():
    b = beta_values(0.5, 1.0, 0.01)
    assert np.array_equal(b, np.arange(0.5, 1.0 + 0.01, 0.01))
    assert b[0] == 0.5


def test_search_picks_first_best_beta():
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(25, 25)) + 2 * np.eye(25)
    t2v = rng.normal(size=(60, 25))
    v2t = rng.normal(size=(25, 60))
    betas = beta_values(0.5, 1.0, 0.1)
    best_beta, best_r1, hist = search_best_beta(t2v, v2t, sim, betas, 1, 2, 1, 2, log=lambda *_: None)
    r1s = [h["t2v"]["R1"] for h in hist]
    assert best_r1 == max(r1s)
    assert best_beta == pytest.approx(float(betas[r1s.index(max(r1s))]))


def test_cli_end_line_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    sim = (rng.normal(size=(30, 30)) + 3 * np.eye(30)).astype(np.float32)
    np.save(tmp_path / "sim.npy", sim)
    np.save(tmp_path / "t2v.npy", rng.normal(size=(50, 30)).astype(np.float32))
    np.save(tmp_path / "v2t.npy", rng.normal(size=(30, 50)).astype(np.float32))
    cmd = [sys.executable, str(REPO / "search_for_best_r1_with_qb_norm.py"), "--sim_matrix", str(tmp_path / "sim.npy"),
           "--train_test_t2v", str(tmp_path / "t2v.npy"), "--train_test_v2t", str(tmp_path / "v2t.npy"),
           "--beta_step", "0.1", "--t2v_theta", "1", "--v2t_theta", "1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("Best beta: ") and ", with R@1: " in last
    bad = subprocess.run(cmd[:2] + ["--sim_matrix", str(tmp_path / "missing.npy")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "not found" in bad.stderr
