"""main.py end to end on the synthetic MSR-VTT-layout dataset (real decoder and loaders) with a tiny CLIP."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import get_tokenizer, write_bpe_vocab
    from preprocess.make_synthetic_dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    try:
        paths = make_synthetic_dataset(str(root / "data"), num_train=8, num_test=6, seed=0, min_frames=6,
                                       max_frames=8)
    except (FileNotFoundError, RuntimeError) as e:  # no ffmpeg at all
        pytest.skip(f"cannot write the synthetic videos: {e}")
    captions = [s["caption"] for s in json.loads(Path(paths["data_path"]).read_text())["sentences"]]
    bpe = write_bpe_vocab(captions, root / "pre" / "bpe.txt.gz", num_merges=100)
    vocab = get_tokenizer(bpe_path=bpe).vocab_size
    torch.manual_seed(0)
    torch.save(CLIP(tiny_clip_config(vocab_size=vocab)).state_dict(), root / "pre" / "tiny.pt")
    return paths, str(root / "pre"), bpe


def _main(args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_main_train_eval_resume_and_qb_norm(synthetic, tmp_path):
    paths, pre, bpe = synthetic
    common = ["--datatype", "msrvtt", "--train_csv", paths["train_csv"], "--val_csv", paths["val_csv"],
              "--data_path", paths["data_path"], "--features_path", paths["features_path"],
              "--pretrained_dir", pre, "--pretrained_clip_name", "tiny.pt", "--bpe_path", bpe,
              "--max_words", "12", "--max_frames", "3", "--feature_framerate", "3", "--slice_framepos", "2",
              "--shared_latent_space", "transformer", "--unified_transformer_layers", "2",
              "--batch_size_val", "8", "--num_thread_reader", "0", "--device", "cpu", "--no_progress", "--seed", "1"]
    out = tmp_path / "run"
    r = _main(common + ["--do_train", "1", "--do_eval", "1", "--epochs", "1", "--batch_size", "4",
                        "--lr", "1e-3", "--n_display", "1", "--save_sim_matrix", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [e["epoch"] for e in res["evaluations"]] == [0, 1]
    assert res["evaluations"][-1]["num_videos"] == 6 and res["evaluations"][-1]["global_step"] == 2
    for name in ("ckpt.pth.tar", "ckpt.best.pth.tar", "config.json", "log.txt", "msrvtt_sim_matrix.npy",
                 "msrvtt_train_test_t2v.npy", "msrvtt_train_test_v2t.npy"):
        assert (out / name).is_file(), name
    assert np.load(out / "msrvtt_sim_matrix.npy").shape == (6, 6)
    assert np.load(out / "msrvtt_train_test_t2v.npy").shape == (24, 6)  # every train caption (3 per video)
    assert np.load(out / "msrvtt_train_test_v2t.npy").shape == (6, 8)
    log = (out / "log.txt").read_text()
    assert "trainable parameters:" in log and "training samples had an unreadable video" in log

    # evaluating the checkpoint reproduces the epoch's numbers
    ev = tmp_path / "eval"
    r = _main(common + ["--do_eval", "1", "--resume", str(out / "ckpt.best.pth.tar"), "--output_dir", str(ev),
                        "--dsl"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((ev / "results.json").read_text())["evaluations"][0]
    want = res["evaluations"][-1]
    assert got["t2v"] == pytest.approx(want["t2v"]) and got["v2t"] == pytest.approx(want["v2t"])
    assert "dsl" in got and "dsl" not in want  # --dsl adds its metrics next to the plain ones

    # reproducibility record: the annotation files this run read, hashed
    rec = json.loads((out / "reproducibility.json").read_text())
    hashed = {Path(e["path"]).name: e["sha256"] for e in rec["annotation_files"]}
    for key in ("train_csv", "data_path", "val_csv"):
        path = Path(paths[key])
        assert hashed[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec["batch"]["global"] == 4 and rec["input"]["max_frames"] == 3
    # per-query ranks: both runs rank the same test set; the comparison of the run with its checkpoint is empty
    c = subprocess.run([sys.executable, "-m", "analysis.compare_runs", str(out), str(ev)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stderr
    assert "rank: same 6, better in B 0, worse in B 0" in c.stdout

    # QB-norm on the saved matrices
    q = subprocess.run([sys.executable, str(REPO / "search_for_best_r1_with_qb_norm.py"),
                        "--sim_matrix", str(out / "msrvtt_sim_matrix.npy"),
                        "--train_test_t2v", str(out / "msrvtt_train_test_t2v.npy"),
                        "--train_test_v2t", str(out / "msrvtt_train_test_v2t.npy"),
                        "--t2v_theta", "1", "--v2t_theta", "1", "--beta_step", "0.25"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    assert q.stdout.strip().splitlines()[-1].startswith("Best beta: ")

    # the beta chosen on the query bank alone: main.py wrote the train x train matrix and its ground truth
    tt, gt = np.load(out / "msrvtt_train_train_t2v.npy"), np.load(out / "msrvtt_train_train_gt.npy")
    assert tt.shape == (24, 8) and sorted(set(gt.tolist())) == list(range(8))  # every caption has its video
    b = subprocess.run([sys.executable, str(REPO / "search_for_best_r1_with_qb_norm.py"),
                        "--sim_matrix", str(out / "msrvtt_sim_matrix.npy"),
                        "--train_test_t2v", str(out / "msrvtt_train_test_t2v.npy"),
                        "--train_test_v2t", str(out / "msrvtt_train_test_v2t.npy"),
                        "--t2v_theta", "1", "--v2t_theta", "1", "--beta_step", "0.25", "--beta_selection", "both",
                        "--cv_folds", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert b.returncode == 0, b.stderr
    assert "query bank only (2-fold CV)" in b.stdout
    assert b.stdout.strip().splitlines()[-1] == q.stdout.strip().splitlines()[-1]
