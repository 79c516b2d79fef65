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


# ------------------------------------------------------------------ beta chosen on the query bank alone
def test_bank_folds_are_video_disjoint_and_cover_every_video():
    from modules.qb_norm import bank_folds

    rng = np.random.default_rng(5)
    caption_video = np.concatenate([np.repeat(np.arange(20), 3), [-1, -1]])  # 2 captions of videos outside
    rng.shuffle(caption_video)
    folds = bank_folds(caption_video, num_folds=4, gallery_size=None, seed=1)
    galleries = np.concatenate([f["gallery"] for f in folds])
    assert sorted(galleries.tolist()) == list(range(20))
    for f in folds:
        # queries: every caption of a gallery video; gt points at that video's column of the gallery
        assert sorted(f["queries"].tolist()) == sorted(np.nonzero(np.isin(caption_video, f["gallery"]))[0].tolist())
        assert np.array_equal(f["gallery"][f["gt"]], caption_video[f["queries"]])
        # the bank never describes a gallery video (as training captions never describe test videos)
        assert not np.isin(caption_video[f["bank"]], f["gallery"]).any()
        assert len(f["bank"]) + len(f["queries"]) == len(caption_video)
    capped = bank_folds(caption_video, num_folds=2, gallery_size=3, seed=1)
    assert [len(f["gallery"]) for f in capped] == [3, 3]
    for f in capped:  # the captions of the fold's videos left out of the gallery are not in the bank either
        assert len(f["bank"]) == len(caption_video) - 3 * 10
    with pytest.raises(ValueError):
        bank_folds(caption_video, num_folds=1)


def test_cross_validate_beta_matches_direct_recomputation():
    from modules.qb_norm import bank_folds, cross_validate_beta

    rng = np.random.default_rng(6)
    caption_video = np.repeat(np.arange(12), 2)
    train_train = rng.normal(size=(24, 12)) * 2 + 3 * np.eye(12)[caption_video]
    betas = beta_values(0.5, 1.0, 0.25)
    best, best_r1, hist = cross_validate_beta(train_train, caption_video, betas, k=1, theta=1, num_folds=3,
                                              seed=2, log=lambda *_: None)
    folds = bank_folds(caption_video, 3, None, 2)
    want = []
    for beta in betas:
        hits = 0
        for f in folds:
            bank = train_train[f["bank"]][:, f["gallery"]]
            queries = train_train[f["queries"]][:, f["gallery"]]
            normed = reference_qb_norm(bank, queries, 1, beta, 1)
            hits += sum(int(np.argsort(-normed[i], kind="stable")[0] == f["gt"][i]) for i in range(len(queries)))
        want.append(100.0 * hits / len(caption_video))
    assert [h["R1"] for h in hist] == pytest.approx(want)
    assert best_r1 == pytest.approx(max(want)) and best == pytest.approx(float(betas[want.index(max(want))]))


def _bank_files(tmp_path, rng):
    n_test, n_train = 30, 40
    sim = (rng.normal(size=(n_test, n_test)) + 3 * np.eye(n_test)).astype(np.float32)
    np.save(tmp_path / "msrvtt_sim_matrix.npy", sim)
    np.save(tmp_path / "t2v.npy", rng.normal(size=(2 * n_train, n_test)).astype(np.float32))
    np.save(tmp_path / "v2t.npy", rng.normal(size=(n_test, n_train)).astype(np.float32))
    gt = np.repeat(np.arange(n_train), 2)
    np.save(tmp_path / "msrvtt_train_train_t2v.npy",
            (rng.normal(size=(2 * n_train, n_train)) + 3 * np.eye(n_train)[gt]).astype(np.float32))
    np.save(tmp_path / "msrvtt_train_train_gt.npy", gt)
    return [sys.executable, str(REPO / "search_for_best_r1_with_qb_norm.py"),
            "--sim_matrix", str(tmp_path / "msrvtt_sim_matrix.npy"), "--train_test_t2v", str(tmp_path / "t2v.npy"),
            "--train_test_v2t", str(tmp_path / "v2t.npy"), "--beta_step", "0.1", "--t2v_theta", "1",
            "--v2t_theta", "1", "--cv_folds", "4"]


def test_cli_both_selections_side_by_side(tmp_path):
    cmd = _bank_files(tmp_path, np.random.default_rng(7))
    plain = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    both = subprocess.run(cmd + ["--beta_selection", "both"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and both.returncode == 0, both.stderr
    # the published search's lines are all there, and the last line is the same
    assert [ln for ln in plain.stdout.splitlines()] == [ln for ln in both.stdout.splitlines()
                                                       if ln in plain.stdout.splitlines()]
    assert both.stdout.strip().splitlines()[-1] == plain.stdout.strip().splitlines()[-1]
    assert "QB-norm beta selection" not in plain.stdout
    table = both.stdout[both.stdout.index("QB-norm beta selection"):]
    for label in ("none (no QB-norm)", "query bank only (4-fold CV)", "test labels (best test R@1)",
                  "from selecting on the test set"):
        assert label in table
    # the bank row reports the test R@1 at the cross-validated beta
    bank_beta = float(both.stdout.split("Bank-selected beta: ")[1].split()[0])
    sim = np.load(tmp_path / "msrvtt_sim_matrix.npy")
    r1 = compute_metrics(qb_norm(np.load(tmp_path / "t2v.npy"), sim, 1, bank_beta, 1))["R1"]
    assert f"{r1:>7.2f}" in table.splitlines()[3]

    bank = subprocess.run(cmd + ["--beta_selection", "bank"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bank.returncode == 0, bank.stderr
    assert "curr R@1" not in bank.stdout  # the test labels are not searched
    assert bank.stdout.strip().splitlines()[-1] == f"Bank-selected beta: {bank_beta}, with R@1: {r1}"

    (tmp_path / "msrvtt_train_train_gt.npy").unlink()
    bad = subprocess.run(cmd + ["--beta_selection", "bank"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "train_train_gt" in bad.stderr


def test_ties_keep_the_first_beta():
    """Two betas with the same R@1: the first (smallest) is kept, in both the test-label search and the
    cross-validation on the bank (a `>=` would keep the last)."""
    from modules.qb_norm import cross_validate_beta

    rng = np.random.default_rng(3)
    betas = [1.0, 1.5, 2.0]
    # every caption's video far ahead of the others: every beta ranks it first
    sim = rng.normal(size=(10, 10)) + 20 * np.eye(10)
    best, best_r1, hist = search_best_beta(rng.normal(size=(30, 10)), rng.normal(size=(10, 30)), sim, betas,
                                           log=lambda *_: None)
    assert [h["t2v"]["R1"] for h in hist] == [100.0] * 3 and (best, best_r1) == (1.0, 100.0)
    caption_video = np.repeat(np.arange(12), 2)
    train_train = rng.normal(size=(24, 12)) + 20 * np.eye(12)[caption_video]
    best, best_r1, hist = cross_validate_beta(train_train, caption_video, betas, k=1, theta=1, num_folds=3,
                                              log=lambda *_: None)
    assert [h["R1"] for h in hist] == [100.0] * 3 and (best, best_r1) == (1.0, 100.0)


def test_bank_labels_follow_the_written_columns():
    """Videos 1 and 3 of 5 left out: the matrix has columns for videos 0, 2, 4; captions of a left-out video
    and of a video past the bank's columns (--qb_norm_train_queries) have none."""
    from training.qb_bank import bank_ground_truth

    caption_video = [0, 0, 1, 2, 2, 3, 4, 4, 5]
    assert bank_ground_truth(caption_video, 9, 5, left_out=[3, 1]).tolist() == [0, 0, -1, 1, 1, -1, 2, 2, -1]
    assert bank_ground_truth(caption_video, 4, 5).tolist() == [0, 0, 1, 2]


def test_main_py_bank_of_the_test_captions_respelt_is_reported(tmp_path, caplog):
    """main.py --save_sim_matrix: a training table whose captions are the test captions in upper case with a
    full stop is a bank that holds every test query (as the model reads it): a warning names the rows."""
    import logging
    from argparse import Namespace

    from dataloaders import build_test_dataset
    from modules.tokenizer import SimpleTokenizer, write_bpe_vocab
    from training.qb_bank import report_test_captions_in_bank

    captions = ["a red square moves left", "a blue circle turns", "green lines fall down"]
    tok = SimpleTokenizer(write_bpe_vocab(captions, str(tmp_path / "bpe.txt.gz"), 40))
    (tmp_path / "test.csv").write_text("video,caption\n" + "".join(f"v{i}.mp4,{c}\n" for i, c in enumerate(captions)))
    (tmp_path / "same.csv").write_text("video,caption\nw.mp4,other words here\n" +
                                       "".join(f"v{i}.mp4,{c.upper()}.\n" for i, c in enumerate(captions)))
    (tmp_path / "some.csv").write_text("video,caption\nw.mp4,other words here\nv1.mp4,A blue circle turns!\n")
    (tmp_path / "other.csv").write_text("video,caption\nw.mp4,a red square moves right\nv1.mp4,blue circles\n")

    def dataset(name, split):
        args = Namespace(datatype="custom", train_csv=str(tmp_path / name), val_csv=str(tmp_path / name),
                         features_path=str(tmp_path), data_path="", max_words=16, max_frames=2)
        return build_test_dataset(args, tok, split)

    test = dataset("test.csv", "test")
    with caplog.at_level(logging.INFO, logger="dgl"):
        got = report_test_captions_in_bank(dataset("same.csv", "train"), test)
    assert got == {"bank_captions": 4, "test_captions_in_bank": 3, "every_test_caption": True}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "every test caption is also a bank caption" in warning[0]
    assert "same.csv line 3 reads as the test caption of test.csv line 2" in warning[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dgl"):
        assert report_test_captions_in_bank(dataset("some.csv", "train"), test)["test_captions_in_bank"] == 1
        assert report_test_captions_in_bank(dataset("same.csv", "train"), test, limit=2)["test_captions_in_bank"] == 1
        assert report_test_captions_in_bank(dataset("other.csv", "train"), test)["test_captions_in_bank"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("1 of 3 test captions are also bank captions" in r.getMessage() for r in caplog.records)


def test_search_refuses_the_test_matrix_as_a_bank_and_non_finite_scores(tmp_path, capsys):
    """search_for_best_r1_with_qb_norm.py: a bank whose rows score the test gallery as every test query does
    (the test matrix passed as --train_test_t2v / --train_test_v2t) is refused in one line naming a bank row,
    a bank holding some test queries gets a note; a NaN or inf similarity is refused naming its row and
    column; nothing is written (not even the log file)."""
    import search_for_best_r1_with_qb_norm as search_script

    rng = np.random.default_rng(7)
    sim = (rng.normal(size=(12, 12)) + 3 * np.eye(12)).astype(np.float32)
    t2v = rng.normal(size=(20, 12)).astype(np.float32)
    v2t = rng.normal(size=(12, 20)).astype(np.float32)
    files = {"sim": sim, "t2v": t2v, "v2t": v2t, "t2v_leak": np.concatenate([t2v[:3], sim[::-1], t2v[3:]]),
             "v2t_leak": np.concatenate([v2t, sim], axis=1), "t2v_some": np.concatenate([t2v, sim[4:6]])}
    for name, matrix in files.items():
        np.save(tmp_path / f"{name}.npy", matrix)
    log = tmp_path / "search.log"

    def search(sim="sim", t2v="t2v", v2t="v2t"):
        argv = ["--sim_matrix", str(tmp_path / f"{sim}.npy"), "--train_test_t2v", str(tmp_path / f"{t2v}.npy"),
                "--train_test_v2t", str(tmp_path / f"{v2t}.npy"), "--beta_step", "0.25", "--log_file", str(log)]
        try:
            code = search_script.main(argv)
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = search(t2v="t2v_leak")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--train_test_t2v" in err and "t2v_leak.npy row 3 scores the test gallery as --sim_matrix row 11" in err
    assert "the bank holds the test queries" in err
    code, _, err = search(v2t="v2t_leak")
    assert code == 2 and "--train_test_v2t" in err and "v2t_leak.npy row 20 scores" in err
    code, _, err = search(t2v="sim")
    assert code == 2 and "sim.npy row 0 scores the test gallery as --sim_matrix row 0" in err
    sim[5, 7] = np.nan
    np.save(tmp_path / "nan.npy", sim)
    code, _, err = search(sim="nan")
    assert code == 2 and "--sim_matrix" in err and "nan.npy row 5 column 7 is nan" in err
    t2v[2, 0] = np.inf
    np.save(tmp_path / "inf.npy", t2v)
    code, _, err = search(t2v="inf")
    assert code == 2 and "inf.npy row 2 column 0 is inf" in err
    with open(tmp_path / "archive.npy", "wb") as f:  # a zip archive (as a checkpoint is) under a .npy name
        np.savez(f, sim=sim)
    code, _, err = search(sim="archive")
    assert code == 2 and "archive.npy: not a .npy array" in err
    assert not log.exists()
    code, out, err = search(t2v="t2v_some")
    assert code == 0, err
    assert "note: 2 rows of --train_test_t2v (e.g. row 20) score the test gallery as test queries do " \
           "(--sim_matrix row 4)" in out
    code, out, _ = search()
    assert code == 0 and "note:" not in out


def test_rows_of_queries_finds_equal_rows_only():
    from modules.qb_norm import rows_of_queries

    rng = np.random.default_rng(3)
    queries = rng.normal(size=(6, 10)) * 30
    bank = np.concatenate([rng.normal(size=(5, 10)) * 30, queries[[4, 1]] + 1e-4, queries[[2]] + 0.5])
    assert rows_of_queries(bank, queries, chunk=3).tolist() == [-1] * 5 + [4, 1, -1]
