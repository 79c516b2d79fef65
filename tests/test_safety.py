"""Misuse never loses a user's work: main.py and the scripts, run as a user runs them on generated files.

Every failure case asserts the exit status (2), the last line of stderr (one line naming the file, row or
flag; no traceback) and that the files of an earlier run are byte-identical afterwards.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_TEST = 4, 3
TRAIN_IDS = [f"video{i}" for i in range(NUM_TRAIN)]
TEST_IDS = [f"video{i}" for i in range(NUM_TRAIN, NUM_TRAIN + NUM_TEST)]
CHECKPOINT_FILES = ("ckpt.pth.tar", "ckpt.best.pth.tar")
# What these runs test is the files they keep and the errors they give, not the kernels a start-up timing
# would choose: the fixed defaults (MKL fp32 products, PyTorch's attention choice) spare each run that timing.
FIXED_KERNELS = ["--cpu_tuning", "0"]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Generated data, a tiny CLIP with its vocabulary, and one finished 1-epoch training run."""
    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import get_tokenizer, write_bpe_vocab
    from preprocess.make_synthetic_dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("safety")
    try:
        data = make_synthetic_dataset(str(root / "data"), num_train=NUM_TRAIN, num_test=NUM_TEST, seed=0,
                                      min_frames=4, max_frames=6)
    except (FileNotFoundError, RuntimeError) as e:  # no ffmpeg at all
        pytest.skip(f"cannot write the synthetic videos: {e}")
    captions = [s["caption"] for s in json.loads(Path(data["data_path"]).read_text())["sentences"]]
    pre = root / "pre"
    bpe = write_bpe_vocab(captions, pre / "bpe.txt.gz", num_merges=60)
    torch.manual_seed(0)
    torch.save(CLIP(tiny_clip_config(vocab_size=get_tokenizer(bpe_path=bpe).vocab_size)).state_dict(),
               pre / "tiny.pt")
    w = {"data": data, "pre": str(pre), "bpe": bpe, "root": root}
    r = main(flags(w, data) + ["--do_train", "1", "--epochs", "1", "--output_dir", str(root / "run")])
    assert r.returncode == 0, r.stderr[-3000:]
    w["run"] = root / "run"
    return w


def flags(w, data=None, model=True) -> list[str]:
    d = data or w["data"]
    out = ["--datatype", "msrvtt", "--train_csv", d["train_csv"], "--val_csv", d["val_csv"],
           "--data_path", d["data_path"], "--features_path", d["features_path"], "--device", "cpu",
           "--num_thread_reader", "0", "--batch_size", "4", "--batch_size_val", "8", "--lr", "1e-3", "--seed", "1"]
    if model:
        out += ["--pretrained_dir", w["pre"], "--pretrained_clip_name", "tiny.pt", "--bpe_path", w["bpe"],
                "--max_words", "12", "--max_frames", "3", "--unified_transformer_layers", "2",
                "--shared_latent_space", "transformer", *FIXED_KERNELS]
    return out


def main(args, cwd=REPO, env=None, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def script(name, args, env_extra, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "VIDEO_PATH", "PRETRAINED_DIR", "EVAL",
                                                            "OUTPUT_DIR", "NUM_GPUS", "CUDA_VISIBLE_DEVICES")}
    env.update(env_extra)
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def earlier_run(w, tmp_path) -> Path:
    """A copy of the finished training run (epoch 1 of 1), to continue or to protect."""
    run = tmp_path / "run"
    shutil.copytree(w["run"], run)
    return run


def data_copy(w, tmp_path) -> dict:
    d = tmp_path / "data"
    shutil.copytree(w["data"]["root"], d)
    return {"root": str(d), "train_csv": str(d / "MSRVTT_train.9k.csv"), "val_csv": str(d / "MSRVTT_JSFUSION_test.csv"),
            "data_path": str(d / "MSRVTT_data.json"), "features_path": str(d / "videos")}


def snapshot(folder: Path, skip=()) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def last_error(r, *needles) -> str:
    """The exit status is 2 and the last line of stderr is main.py's one-line error naming ``needles``."""
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("main.py: error: "), line
    for n in needles:
        assert n in line, (n, line)
    print(line)  # shown by pytest -rP
    return line


# ---------------------------------------------------------------------------------------------- 1. evaluation
def test_evaluation_through_the_scripts_never_trains(world, tmp_path):
    run = earlier_run(world, tmp_path)
    before = snapshot(run)
    env = {"DATA_PATH": world["data"]["root"], "PRETRAINED_DIR": world["pre"], "CLIP_NAME": "tiny.pt",
           "DGL_BPE_PATH": world["bpe"], "NUM_GPUS": "1"}
    small = ["--device", "cpu", "--precision", "fp32", "--max_frames", "3", "--max_words", "12",
             "--unified_transformer_layers", "2", "--batch_size_val", "8", "--num_thread_reader", "0",
             *FIXED_KERNELS]
    # the README's command: --do_eval 1 --resume <checkpoint>
    r = script("msrvtt.sh", small + ["--do_eval", "1", "--resume", str(run / "ckpt.best.pth.tar")], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = sorted((tmp_path / "runs").glob("msrvtt_eval_*"))
    assert len(evals) == 1, evals
    assert (evals[0] / "results.json").is_file() and not any(evals[0].glob("ckpt*"))
    res = json.loads((evals[0] / "results.json").read_text())
    assert [e["tag"] for e in res["evaluations"]] == ["eval"] and res["evaluations"][0]["global_step"] == 1
    assert "training:" not in r.stderr
    # pointing an evaluation at the training folder is refused
    r = script("msrvtt.sh", small + ["--do_eval", "1", "--resume", str(run / "ckpt.best.pth.tar"),
                                     "--output_dir", str(run)], env, tmp_path)
    last_error(r, f"--output_dir {run} holds a training run", "another --output_dir")
    assert snapshot(run) == before


def test_eval_switch_of_the_scripts(world, tmp_path):
    run = earlier_run(world, tmp_path)
    before = snapshot(run)
    env = {"DATA_PATH": world["data"]["root"], "PRETRAINED_DIR": world["pre"], "CLIP_NAME": "tiny.pt",
           "DGL_BPE_PATH": world["bpe"], "NUM_GPUS": "1", "EVAL": "1", "OUTPUT_DIR": str(tmp_path / "ev")}
    r = script("msrvtt.sh", ["--device", "cpu", "--precision", "fp32", "--max_frames", "3", "--max_words", "12",
                             "--unified_transformer_layers", "2", "--batch_size_val", "8", "--num_thread_reader", "0",
                             *FIXED_KERNELS, "--resume", str(run / "ckpt.pth.tar")], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[msrvtt] eval:" in r.stdout
    assert (tmp_path / "ev" / "results.json").is_file() and not (tmp_path / "ev" / "ckpt.pth.tar").exists()
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------- 2. no overwrite
def test_a_new_run_never_overwrites_a_run(world, tmp_path):
    run = earlier_run(world, tmp_path)
    before = snapshot(run)
    r = main(flags(world) + ["--do_train", "1", "--epochs", "1", "--output_dir", str(run)])
    last_error(r, f"--output_dir {run} already holds a run", f"--resume {run / 'ckpt.pth.tar'}",
               "--overwrite_output_dir")
    assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(run) == before
    # weights-only loading starts a new schedule: that is a new run too
    r = main(flags(world) + ["--epochs", "1", "--output_dir", str(run), "--resume", str(run / "ckpt.pth.tar"),
                             "--load_from_pretrained", "1"])
    last_error(r, "already holds a run")
    assert snapshot(run) == before


def test_overwrite_output_dir_starts_over(world, tmp_path):
    run = earlier_run(world, tmp_path)
    (run / "log.txt").write_text("the earlier run's log\n")
    # files of the earlier run that this run does not write again (a longer run, --save_sim_matrix)
    for name in ("ranks_epoch7.json", "msrvtt_train_train_t2v.npy", "msrvtt_caption_video_index.npy"):
        (run / name).write_text("earlier run\n")
    r = main(flags(world) + ["--do_train", "1", "--epochs", "1", "--output_dir", str(run), "--overwrite_output_dir",
                             "--no_tensorboard"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the earlier run's log" not in (run / "log.txt").read_text()
    assert not (run / "tensorboard").exists()
    assert not [p for p in ("ranks_epoch7.json", "msrvtt_train_train_t2v.npy", "msrvtt_caption_video_index.npy")
                if (run / p).exists()]
    assert "--overwrite_output_dir: removed the earlier run's" in r.stderr


def test_overwrite_output_dir_with_resume_inside_it_continues_the_run(world, tmp_path):
    """--resume of the folder's own checkpoint continues that run: --overwrite_output_dir removes nothing."""
    run = earlier_run(world, tmp_path)
    (run / "log.txt").write_text("the earlier run's log\n")
    ckpt_before = hashlib.sha256((run / "ckpt.pth.tar").read_bytes()).hexdigest()
    r = main(flags(world) + ["--do_train", "1", "--epochs", "2", "--output_dir", str(run), "--overwrite_output_dir",
                             "--resume", str(run / "ckpt.pth.tar"), "--no_tensorboard"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removed the earlier run's" not in r.stderr
    log = (run / "log.txt").read_text()
    assert log.startswith("the earlier run's log\n") and "[resume] loaded weights" in log
    ckpt = torch.load(run / "ckpt.pth.tar", weights_only=False)
    assert ckpt["epoch"] == 2 and hashlib.sha256((run / "ckpt.pth.tar").read_bytes()).hexdigest() != ckpt_before
    evaluations = json.loads((run / "results.json").read_text())["evaluations"]
    assert [e["epoch"] for e in evaluations][-2:] == [1, 2]  # the first epoch's evaluation is kept


# ---------------------------------------------------------------------------------------------- 3. bad data
def test_missing_and_empty_videos_stop_before_training(world, tmp_path):
    run = earlier_run(world, tmp_path)
    before = snapshot(run, skip=("log.txt",))
    data = data_copy(world, tmp_path)
    os.remove(os.path.join(data["features_path"], "video1.mp4"))
    open(os.path.join(data["features_path"], "video2.mp4"), "wb").close()
    r = main(flags(world, data) + ["--epochs", "2", "--output_dir", str(run), "--resume", str(run / "ckpt.pth.tar")])
    line = last_error(r, f"2 of {NUM_TRAIN} train videos are missing or empty",
                      os.path.join(data["features_path"], "video1.mp4")
                      + " (MSRVTT_train.9k.csv line 3: file not found)",
                      "(MSRVTT_train.9k.csv line 4: empty file (0 bytes))", "--skip_bad_videos")
    assert "epoch 2" not in r.stderr and "training:" not in r.stderr, line
    assert snapshot(run, skip=("log.txt",)) == before


def test_skip_bad_videos_leaves_them_out_and_counts_them(world, tmp_path):
    data = data_copy(world, tmp_path)
    os.remove(os.path.join(data["features_path"], "video1.mp4"))       # a training video
    open(os.path.join(data["features_path"], TEST_IDS[0] + ".mp4"), "wb").close()   # a test video
    out = tmp_path / "skip"
    r = main(flags(world, data) + ["--epochs", "1", "--batch_size", "2", "--skip_bad_videos", "--save_sim_matrix",
                                   "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["left_out"]["train"]["videos"] == 1 and res["left_out"]["train"]["captions"] == 3
    assert res["left_out"]["test"]["videos"] == 1 and res["left_out"]["test"]["captions"] == 1
    assert res["left_out"]["test"]["comparable_to_full_test_set"] is False
    ev = res["evaluations"][-1]
    # the bad test video is gone with its caption, not replaced by another video
    assert ev["num_videos"] == NUM_TEST - 1 and ev["num_captions"] == NUM_TEST - 1
    assert ev["test_left_out"] == {"videos": 1, "captions": 1, "comparable_to_full_test_set": False}
    import numpy as np

    assert np.load(out / "msrvtt_sim_matrix.npy").shape == (NUM_TEST - 1, NUM_TEST - 1)
    assert np.load(out / "msrvtt_train_test_v2t.npy").shape == (NUM_TEST - 1, NUM_TRAIN - 1)   # bank without it
    # the bank's labels follow the columns written: video1 (the 2nd of 4) has no column, so the captions of
    # video0/video2/video3 are labelled 0/1/2 and those of video1 -1
    sentences = json.loads(Path(data["data_path"]).read_text())["sentences"]
    column = {"video0": 0, "video1": -1, "video2": 1, "video3": 2}
    expected = [column[s["video_id"]] for s in sentences if s["video_id"] in TRAIN_IDS]
    assert np.load(out / "msrvtt_train_train_t2v.npy").shape == (len(expected), NUM_TRAIN - 1)
    assert np.load(out / "msrvtt_train_train_gt.npy").tolist() == expected
    log = (out / "log.txt").read_text()
    assert "NOT comparable to those on the full test set" in log
    assert f"1 of {NUM_TRAIN} videos are missing or empty and were left out with their 3 captions" in log
    # progress bars are off when stderr is not a terminal
    assert "\r" not in r.stderr and "it/s" not in r.stderr


def test_video_failing_to_decode_during_training(world, tmp_path):
    run = earlier_run(world, tmp_path)
    kept = {k: v for k, v in snapshot(run).items() if k in CHECKPOINT_FILES + ("results.json",)}
    data = data_copy(world, tmp_path)
    bad = os.path.join(data["features_path"], "video1.mp4")
    with open(bad, "wb") as f:
        f.write(os.urandom(4096))        # present and non-empty: passes the start-up check
    r = main(flags(world, data) + ["--epochs", "2", "--output_dir", str(run), "--resume", str(run / "ckpt.pth.tar"),
                                   "--num_thread_reader", "1"])
    last_error(r, bad, "listed in MSRVTT_train.9k.csv line 3", "undecodable or truncated",
               f"{run / 'ckpt.pth.tar'} (epoch 1) is intact", "--skip_bad_videos")
    now = snapshot(run)
    assert {k: now[k] for k in kept} == kept
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- 4. test set
def test_bad_test_video_is_never_replaced(world, tmp_path):
    run = earlier_run(world, tmp_path)
    before = snapshot(run)
    data = data_copy(world, tmp_path)
    bad = os.path.join(data["features_path"], TEST_IDS[1] + ".mp4")
    with open(bad, "wb") as f:
        f.write(os.urandom(4096))
    ckpt = str(run / "ckpt.best.pth.tar")
    r = main(flags(world, data) + ["--do_eval", "1", "--resume", ckpt, "--output_dir", str(tmp_path / "e1")])
    last_error(r, bad, "undecodable or truncated", "--skip_bad_videos")
    r = main(flags(world, data) + ["--do_eval", "1", "--resume", ckpt, "--output_dir", str(tmp_path / "e2"),
                                   "--skip_bad_videos"])
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((tmp_path / "e2" / "results.json").read_text())["evaluations"][0]
    assert ev["num_videos"] == NUM_TEST - 1 and ev["num_captions"] == NUM_TEST - 1
    assert ev["test_left_out"] == {"videos": 1, "captions": 1, "comparable_to_full_test_set": False}
    # the per-query ranks file lists the evaluated rows only: captions and video ids line up with the ranks
    ranks = json.loads((tmp_path / "e2" / ev["ranks_file"]).read_text())
    t2v = ranks["t2v"]
    assert len(t2v["rank"]) == len(t2v["video"]) == len(t2v["caption"]) == NUM_TEST - 1
    assert sorted(set(t2v["video"])) == list(range(NUM_TEST - 1))
    assert ranks["video_ids"] == [v for v in TEST_IDS if v != TEST_IDS[1]]
    assert "not comparable to those on the full test set" in r.stderr
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------- 5. one-line errors
def _non_utf8(data):
    p = Path(data["val_csv"])
    lines = p.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"moves", b"mov\xe9s")
    p.write_bytes(b"\n".join(lines))
    return "MSRVTT_JSFUSION_test.csv line 3: not UTF-8 text (byte 0xe9"


def _header_only(data):
    Path(data["train_csv"]).write_text("video_id\n")
    return "MSRVTT_train.9k.csv: no rows after the header"


def _empty_caption_in_json(data):
    p = Path(data["data_path"])
    d = json.loads(p.read_text())
    k = next(i for i, s in enumerate(d["sentences"]) if s["video_id"] == "video2")
    d["sentences"][k]["caption"] = "  "
    p.write_text(json.dumps(d))
    return f"MSRVTT_data.json sentences[{k}]: empty caption (video video2)"


@pytest.mark.parametrize("damage", [_non_utf8, _header_only, _empty_caption_in_json],
                         ids=["non-utf8", "header-only", "empty-caption-json"])
def test_annotation_errors_name_file_and_row(world, tmp_path, damage):
    run = earlier_run(world, tmp_path)
    before = snapshot(run, skip=("log.txt",))
    data = data_copy(world, tmp_path)
    expected = damage(data)
    r = main(flags(world, data) + ["--epochs", "2", "--output_dir", str(run), "--resume", str(run / "ckpt.pth.tar")])
    last_error(r, "cannot load the msrvtt data: ", expected)
    assert snapshot(run, skip=("log.txt",)) == before


@pytest.mark.parametrize("kind", ["truncated", "garbage", "text"])
def test_corrupt_checkpoint(world, tmp_path, kind):
    run = earlier_run(world, tmp_path)
    before = snapshot(run)
    bad = tmp_path / "bad.pth.tar"
    raw = (run / "ckpt.pth.tar").read_bytes()
    content = {"truncated": raw[: len(raw) // 2], "garbage": b"\x80\x04" + os.urandom(512),
               "text": b"junk\n"}[kind]  # "junk": the unpickler fails with a KeyError
    bad.write_bytes(content)
    r = main(flags(world) + ["--do_eval", "1", "--resume", str(bad), "--output_dir", str(tmp_path / "e")])
    last_error(r, f"--resume {bad} is not a readable checkpoint")
    assert "weights_only" not in r.stderr
    assert snapshot(run) == before


def test_checkpoint_of_the_other_latent_space(world, tmp_path):
    run = earlier_run(world, tmp_path)
    before = snapshot(run)
    args = flags(world) + ["--do_eval", "1", "--resume", str(run / "ckpt.pth.tar"), "--output_dir", str(tmp_path / "e"),
                           "--shared_latent_space", "linear"]
    r = main(args)
    line = last_error(r, "this checkpoint is a transformer-latent-space DGL; pass --shared_latent_space transformer")
    assert len(line) < 400
    assert snapshot(run) == before


def test_output_dir_that_is_a_file(world, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    r = main(flags(world) + ["--epochs", "1", "--output_dir", str(target)])
    last_error(r, f"--output_dir {target} is a file, not a folder")
    assert target.read_text() == "keep me\n"
    r = main(flags(world) + ["--epochs", "1", "--output_dir", str(target / "run")])
    last_error(r, f"{target} is a file, not a folder")


def _main_where_not_writable(locked: Path, args):
    """main.py with ``locked`` not writable to it. A user other than root: the folder's permissions. Root
    (CI) writes anywhere: a read-only mount over the folder, in a mount namespace of main.py's own; where
    mounting is not allowed, main.py runs as the unprivileged user nobody, on inputs it can read."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            return main(args)
        finally:
            locked.chmod(stat.S_IRWXU)
    mount = 'mount -t tmpfs -o ro tmpfs "$0" || exit 97; exec "$@"'
    unshare = shutil.which("unshare")
    if unshare:
        r = subprocess.run([unshare, "-m", "sh", "-c", mount, str(locked), sys.executable, str(REPO / "main.py"),
                            *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        if r.returncode != 97:
            return r
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root without unshare/mount or setpriv: no way to make a folder unwritable")
    public = Path(tempfile.mkdtemp(prefix="dgl-unwritable-"))
    try:
        public.chmod(0o755)
        copies = {}
        for arg in args:  # the inputs, where the user nobody can read them
            if os.path.exists(arg) and not arg.startswith(str(REPO)):
                folder = public / f"in{len(copies)}"
                folder.mkdir()
                copies[arg] = str(folder / os.path.basename(arg))
                (shutil.copytree if os.path.isdir(arg) else shutil.copy)(arg, copies[arg])
        for p in public.rglob("*"):
            p.chmod(0o755)
        target = public / "locked"
        target.mkdir(mode=0o555)
        out_args = [copies.get(a, a).replace(str(locked), str(target)) for a in args]
        r = subprocess.run([setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                            str(REPO / "main.py"), *out_args], cwd="/", capture_output=True, text=True, timeout=300)
        r.stderr = r.stderr.replace(str(target), str(locked))
        return r
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_output_dir_not_writable(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    r = _main_where_not_writable(locked, flags(world) + ["--epochs", "1", "--output_dir", str(locked / "run")])
    last_error(r, f"--output_dir {locked / 'run'} is not writable")
    assert os.listdir(locked) == []


FULL_DISK = """
import errno, os, runpy, sys
real_fsync = os.fsync
def fsync(fd):
    if ".ckpt.pth.tar." in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)
os.fsync = fsync
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell the file being written")
def test_full_disk_while_writing_the_checkpoint(world, tmp_path):
    run = earlier_run(world, tmp_path)
    kept = {k: v for k, v in snapshot(run).items() if k in CHECKPOINT_FILES}
    r = subprocess.run([sys.executable, "-c", FULL_DISK, str(REPO / "main.py"), *flags(world), "--epochs", "2",
                        "--output_dir", str(run), "--resume", str(run / "ckpt.pth.tar")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    last_error(r, f"no space left on device while writing {run / 'ckpt.pth.tar'}")
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]     # no partial file left behind
    now = snapshot(run)
    assert {k: now[k] for k in kept} == kept


def test_stale_temporary_files_are_removed(world, tmp_path):
    run = earlier_run(world, tmp_path)
    kept = {k: v for k, v in snapshot(run).items() if k in CHECKPOINT_FILES + ("results.json",)}
    for name in (".ckpt.pth.tar.k1l2m3.tmp", ".results.json.a8b9c0.tmp"):
        (run / name).write_bytes(b"half a file")
    (run / "notes.tmp").write_text("not ours")
    r = main(flags(world) + ["--epochs", "1", "--output_dir", str(run), "--resume", str(run / "ckpt.pth.tar")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removed 2 temporary file(s) left by an interrupted write" in r.stderr
    assert not (run / ".ckpt.pth.tar.k1l2m3.tmp").exists() and (run / "notes.tmp").exists()
    now = snapshot(run)
    assert {k: now[k] for k in kept} == kept


# ---------------------------------------------------------------------------------------------- 6. scripts
@pytest.mark.slow  # bf16 start-up checks take minutes on CPUs without avx512_bf16
def test_script_error_is_main_py_line_and_status(world, tmp_path):
    data = data_copy(world, tmp_path)
    Path(data["train_csv"]).write_text("video_id\n")
    env = {"DATA_PATH": data["root"], "PRETRAINED_DIR": world["pre"], "CLIP_NAME": "tiny.pt",
           "DGL_BPE_PATH": world["bpe"]}
    r = script("msrvtt.sh", ["--device", "cpu", "--max_frames", "3", "--unified_transformer_layers", "2",
                             "--output_dir", str(tmp_path / "o")], env, tmp_path)
    last_error(r, "MSRVTT_train.9k.csv: no rows after the header")
    # two processes under torchrun: still main.py's line last, and its exit status
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(NUM_GPUS="2", MASTER_PORT=str(port))
    r = script("msrvtt.sh", ["--device", "cpu", "--max_frames", "3", "--unified_transformer_layers", "2",
                             "--output_dir", str(tmp_path / "o2")], env, tmp_path)
    last_error(r, "MSRVTT_train.9k.csv: no rows after the header")
    r = script("vatex.sh", ["--help"], {}, tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("DATA_PATH", "VIDEO_PATH", "PRETRAINED_DIR", "OUTPUT_DIR", "EVAL", "NUM_GPUS", "CLIP_NAME"):
        assert name in r.stdout, name
    assert "usage: main.py" in r.stdout and "--skip_bad_videos" in r.stdout   # main.py's --help follows


# ---------------------------------------------------------------------------------------------- 7. logs
def test_finished_run_resumed_says_so(world, tmp_path):
    run = earlier_run(world, tmp_path)
    kept = {k: v for k, v in snapshot(run).items() if k in CHECKPOINT_FILES + ("results.json",)}
    r = main(flags(world) + ["--epochs", "1", "--output_dir", str(run), "--resume", str(run / "ckpt.pth.tar")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "this run is already finished: the checkpoint completed 1 of --epochs 1; nothing to train" in r.stderr
    assert "epochs 2..1" not in r.stderr and "training:" not in r.stderr
    now = snapshot(run)
    assert {k: now[k] for k in kept} == kept


def test_tensorboard_purges_redone_steps_on_resume(tmp_path):
    """A run dies in epoch 2 after logging some steps; the resumed run redoes them: each step is shown once."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from dataloaders.base import BadVideoError
    from tests.toy import ToyData, run_toy, tiny_dgl, toy_args
    from training.runner import run

    class DiesInEpoch2:
        def __init__(self, pairs, after):
            self.pairs, self.calls, self.after = pairs, 0, after

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            self.calls += 1
            if self.calls > self.after:
                raise BadVideoError("msrvtt train item 3: video 'v3' (listed in toy line 4): cannot read video v3.mp4")
            return self.pairs[i]

    out = tmp_path / "tb"
    data = ToyData()
    args = toy_args(out, epochs=2)
    with pytest.raises(SystemExit) as info:   # 16 samples, batch 4: dies in epoch 2 after 2 of its 4 steps
        run(args, model=tiny_dgl(), train_dataset=DiesInEpoch2(data.train(), 16 + 8), test_dataset=data)
    assert info.value.code == 2
    run_toy(str(out), epochs=2, resume=str(out / "ckpt.pth.tar"))

    steps, purged = [], []
    # events.out.tfevents.<seconds>.<host>.<pid>.<counter>: both runs may start within one second, and they
    # share this process, so the per-process counter orders them
    def written_order(p):
        parts = p.name.split(".")
        return int(parts[3]), int(parts[-1])

    for f in sorted((out / "tensorboard").iterdir(), key=written_order):
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                purged.append(ev.step)
                steps = [s for s in steps if s < ev.step]          # what TensorBoard shows
            for v in ev.summary.value:
                if v.tag == "train/loss":
                    steps.append(ev.step)
    assert purged == [5]                 # the resumed run's first step: the checkpoint was saved at step 4
    assert sorted(steps) == list(range(1, 9))    # every step once


def test_demo_dataset_files_get_normal_permissions(world):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv", "MSRVTT_data.json", "videos/video0.mp4"):
        mode = stat.S_IMODE(os.stat(os.path.join(world["data"]["root"], name)).st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))


def test_video_file_check_in_parallel_matches_a_loop(tmp_path):
    from dataloaders.checks import PARALLEL_FROM, find_bad_video_files

    paths = []
    for i in range(PARALLEL_FROM + 40):
        p = tmp_path / f"v{i}.mp4"
        if i % 97 == 5:
            p.write_bytes(b"")
        elif i % 89 != 7:
            p.write_bytes(b"x")
        paths.append(str(p))
    paths.append(str(tmp_path))   # a folder
    expected = [(i, "empty file (0 bytes)") if i % 97 == 5 else (i, "file not found")
                for i in range(PARALLEL_FROM + 40) if i % 97 == 5 or i % 89 == 7]
    expected.append((len(paths) - 1, "not a regular file"))
    assert find_bad_video_files(paths, workers=4) == expected
    assert find_bad_video_files(paths, workers=1) == expected


# ---------------------------------------------------------------------------------------------- 8. structure
def test_runner_is_a_short_sequence_of_named_steps():
    tree = ast.parse((REPO / "training" / "runner.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno < 60, f"{node.name} is {node.end_lineno - node.lineno} lines"
            inner = [n.name for n in ast.walk(node) if n is not node and isinstance(n, ast.FunctionDef)]
            assert not inner, f"nested functions in {node.name}: {inner}"
    run_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    calls = [n.func.attr for n in sorted(ast.walk(run_fn), key=lambda n: getattr(n, "lineno", 0))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "r"]
    assert calls == ["describe_setup", "load_resume_weights", "validate_data", "build_training", "restore_state", "open_logs", "evaluate",
                     "train", "finish", "stop"]


# ------------------------------------------------------------------------------- two runs, one output folder
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two main.py runs started with one --output_dir: the second is refused in one line while the first runs
    (before, both reported success and the folder ended with a mix of their files); a run that finished in
    the meantime is found under the lock; the lock goes with the process, however it ends."""
    from tests.toy import run_toy

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from training.outputs import lock_output_dir; lock_output_dir(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(120)"), str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exc:
            run_toy(str(out), epochs=1, cpu_tuning=0, no_tensorboard=True)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2
        assert f"--output_dir {out} is in use by another main.py run; wait for it to end" in err
        assert sorted(os.listdir(out)) == [".main.lock"]
    finally:
        holder.kill()  # killed: the system releases its lock
        holder.wait()
    first = run_toy(str(out), epochs=1, cpu_tuning=0, no_tensorboard=True)
    assert first["results"]["evaluations"]
    # the same process goes on in the folder it released (--resume), a new run is refused under the lock
    run_toy(str(out), epochs=2, resume=str(out / "ckpt.pth.tar"), cpu_tuning=0, no_tensorboard=True)
    from training.config import build_parser
    from training.outputs import prepare_output_dir

    args = build_parser().parse_args(["--output_dir", str(out), "--do_train", "1", "--train_csv", "x"])
    with pytest.raises(SystemExit):
        prepare_output_dir(args, True)
    assert "already holds a run" in capsys.readouterr().err
    run_toy(str(out), epochs=3, resume=str(out / "ckpt.pth.tar"), cpu_tuning=0, no_tensorboard=True)  # released
