"""The decoded-frame cache (preprocess/frame_cache.py, dataloaders/frame_cache.py): the same model input as
decoding the file (raw: bit for bit; JPEG: within a stated tolerance), changed videos read from the file,
an interrupted build that opens and completes, and the datasets' --frame_cache."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import pytest
import torch

from dataloaders import build_test_dataset, build_train_dataset
from dataloaders.frame_cache import FrameCache, FrameCacheError, complete_shards, shard_paths
from dataloaders.video import CLIP_STD, FRAME_ORDER_RANDOM, load_video
from preprocess.ffmpeg_tools import write_video
from preprocess.frame_cache import build_frame_cache, main as cache_main
from preprocess.make_synthetic_dataset import make_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, T = 48, 6
# JPEG at quality 90 against raw, in pixel levels (0..255) of the model input, on these clips of coloured
# noise blocks (JPEG's worst case; docs/data-loading.md gives the figures on smoother content)
JPEG_MEAN_LEVELS, JPEG_MAX_LEVELS = 6.0, 48.0


def textured(num_frames, height, width, seed):
    """Moving noise blocks: a lossy encode of it exercises real decoding (not flat colour)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 4 + 2, width // 4 + 2, 3)).repeat(4, 0).repeat(4, 1)
    return np.stack([np.roll(base, 3 * k, axis=1)[:height, :width] for k in range(num_frames)]).astype(np.uint8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """(path, start, end) clips: a large frame (cropped), a small one (zero-padded), a span of a
    longer video, a video shorter than T (last frame repeated)."""
    d = tmp_path_factory.mktemp("clips")
    big = write_video(str(d / "big.mp4"), textured(30, 64, 96, 1), fps=3.0, crf=23)
    small = write_video(str(d / "small.mp4"), textured(20, 32, 40, 2), fps=3.0, crf=23)
    long = write_video(str(d / "long.mp4"), textured(60, 56, 80, 3), fps=3.0, crf=23, keyint=4)
    short = write_video(str(d / "short.mp4"), textured(4, 48, 64, 4), fps=3.0, crf=23)
    return [(big, None, None), (small, None, None), (long, 3.0, 9.0), (long, None, None), (short, None, None)]


def loads(path, start, end, train, cache=None, seed=0, frame_order=0):
    g = torch.Generator().manual_seed(seed)
    clip = load_video(path, T, SIZE, train=train, start=start, end=end, frame_order=frame_order, generator=g,
                      frame_cache=cache)
    return clip, g.get_state()


def assert_same(a, b):
    (ca, ga), (cb, gb) = a, b
    assert torch.equal(ca.video, cb.video) and torch.equal(ca.mask, cb.mask) and ca.info == cb.info
    assert torch.equal(ga, gb)  # the same random draws were made


@pytest.fixture(scope="module")
def raw_cache(clips, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "raw")
    summary = build_frame_cache(out, clips, frames="all", max_frames=T, size=SIZE, shard_mb=0.05, log=None)
    assert summary["cached"] == len(clips) and not summary["failed"] and len(summary["shards"]) > 1
    return out


def test_raw_cache_equals_the_video_path_for_training_and_evaluation(clips, raw_cache):
    cache = FrameCache(raw_cache)
    for path, start, end in clips:
        for train, seed, order in ((True, 0, 0), (True, 1, 0), (True, 2, FRAME_ORDER_RANDOM), (False, 0, 0)):
            assert_same(loads(path, start, end, train, None, seed, order),
                        loads(path, start, end, train, cache, seed, order))
    assert cache.misses == 0 and cache.hits == 4 * len(clips)  # every clip came from the cache
    small = load_video(clips[1][0], T, SIZE, train=False, frame_cache=cache).video
    assert (small[:, :, 0, :] == small[0, :, 0, 0].view(3, 1, 1).expand(-1, T, SIZE).transpose(0, 1)).all()


def test_eval_cache_serves_evaluation_and_falls_back_for_training(clips, tmp_path):
    out = str(tmp_path / "eval")
    build_frame_cache(out, clips, frames="eval", max_frames=T, size=SIZE, log=None)
    cache = FrameCache(out)
    raw_frames = sum(len(v[0].frames) for v in cache.videos.values())
    assert raw_frames < 30 + 20 + 60  # only evaluation frames were stored
    for path, start, end in clips:
        assert_same(loads(path, start, end, False), loads(path, start, end, False, cache))
    hits = cache.hits
    assert hits == len(clips)
    # training asks for frames the cache lacks: read from the file, with one draw of the random offsets
    assert_same(loads(*clips[0], True, None, 5), loads(*clips[0], True, cache, 5))
    assert cache.misses == 1 and cache.hits == hits


def test_jpeg_cache_within_tolerance(clips, tmp_path):
    out = str(tmp_path / "jpeg")
    build_frame_cache(out, clips, frames="all", max_frames=T, size=SIZE, encoding="jpeg", quality=90, log=None)
    jpeg_bytes = sum(os.path.getsize(shard_paths(out, n)[0]) for n in complete_shards(out))
    rows = 30 + 20 + (9 * 3 - 3 * 3 + 1) + 60 + 4
    assert jpeg_bytes < 0.6 * rows * SIZE * SIZE * 3  # smaller than raw (noise: the hardest case for JPEG)
    cache = FrameCache(out)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for path, start, end in clips:
        (ref, _), (got, _) = loads(path, start, end, True, None, 3), loads(path, start, end, True, cache, 3)
        levels = ((got.video - ref.video) * std * 255).abs()
        assert torch.equal(ref.mask, got.mask) and ref.info == got.info
        assert levels.mean() <= JPEG_MEAN_LEVELS and levels.max() <= JPEG_MAX_LEVELS, (path, levels.mean(),
                                                                                       levels.max())
    assert cache.hits == len(clips)


def test_changed_video_is_read_from_the_file_and_recached(tmp_path):
    videos = tmp_path / "v"
    a = write_video(str(videos / "a.mp4"), textured(12, 48, 64, 7), crf=23)
    b = write_video(str(videos / "b.mp4"), textured(12, 48, 64, 8), crf=23)
    out = str(tmp_path / "cache")
    build_frame_cache(out, [a, b], max_frames=T, size=SIZE, log=None)
    write_video(a, textured(15, 48, 64, 9), crf=23)  # new content, same name
    st = os.stat(b)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, touched
    cache = FrameCache(out)
    for path in (a, b):
        assert_same(loads(path, None, None, False), loads(path, None, None, False, cache))
    assert cache.hits == 0 and cache.misses == 2
    summary = build_frame_cache(out, [a, b], max_frames=T, size=SIZE, log=None)
    assert summary["cached"] == 2 and summary["skipped"] == 0
    assert build_frame_cache(out, [a, b], max_frames=T, size=SIZE, log=None)["skipped"] == 2  # incremental
    cache = FrameCache(out)
    for path in (a, b):
        assert_same(loads(path, None, None, True, None, 4), loads(path, None, None, True, cache, 4))
    assert cache.hits == 2 and cache.videos[os.path.realpath(a)][0].num_frames == 15


def test_video_replaced_keeping_its_modification_time_is_read_from_the_file(tmp_path):
    """A file replaced by another video of another size that keeps the old modification time (cp -p,
    rsync -t, a restored backup) is not the cached video: its size alone tells it, and a rebuild caches it."""
    a = write_video(str(tmp_path / "v" / "a.mp4"), textured(12, 48, 64, 7), crf=23)
    out = str(tmp_path / "cache")
    build_frame_cache(out, [a], max_frames=T, size=SIZE, log=None)
    st = os.stat(a)
    write_video(a, textured(15, 48, 64, 9), crf=23)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(a).st_size != st.st_size and os.stat(a).st_mtime_ns == st.st_mtime_ns
    cache = FrameCache(out)
    assert_same(loads(a, None, None, False), loads(a, None, None, False, cache))
    assert cache.hits == 0 and cache.misses == 1
    assert build_frame_cache(out, [a], max_frames=T, size=SIZE, log=None)["cached"] == 1
    cache = FrameCache(out)
    assert_same(loads(a, None, None, True, None, 4), loads(a, None, None, True, cache, 4))
    assert cache.hits == 1 and cache.videos[os.path.realpath(a)][0].num_frames == 15


def test_interrupted_build_opens_and_completes(clips, raw_cache, tmp_path):
    out = str(tmp_path / "cut")

    class Killed(Exception):
        pass

    def stop(number):
        raise Killed(number)

    with pytest.raises(Killed):
        build_frame_cache(out, clips, max_frames=T, size=SIZE, shard_mb=0.05, on_shard=stop, log=None)
    # what a kill while writing the next shard leaves: its frames without entries, a temporary file
    npy, _ = shard_paths(out, 1)
    with open(npy, "wb") as f:
        f.write(b"\x93NUMPY partial")
    with open(os.path.join(out, "shards", ".shard-000002.npy.x1y2z3.tmp"), "wb") as f:
        f.write(b"partial")
    partial = FrameCache(out)
    assert 1 <= len(partial) < len(clips) - 1
    summary = build_frame_cache(out, clips, max_frames=T, size=SIZE, shard_mb=0.05, log=None)
    assert summary["skipped"] >= 1 and not summary["failed"]
    assert sorted(os.listdir(os.path.join(out, "shards"))) == sorted(
        name for n in complete_shards(out) for name in map(os.path.basename, shard_paths(out, n)))
    done, ref = FrameCache(out), FrameCache(raw_cache)
    assert sorted(done.videos) == sorted(ref.videos)
    for key in ref.videos:
        a, b = done.videos[key][0], ref.videos[key][0]
        assert np.array_equal(a.frames, b.frames)
        assert torch.equal(done.frames(a, list(a.frames)), ref.frames(b, list(b.frames)))


def test_sigkill_during_build_leaves_a_cache_that_opens_and_completes(tmp_path):
    videos = tmp_path / "v"
    for k in range(8):
        write_video(str(videos / f"c{k}.mp4"), textured(24, 48, 64, 20 + k), crf=23)
    out = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "preprocess.frame_cache", "--out", out, "--videos", str(videos), "--size",
           str(SIZE), "--shard_mb", "0.2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(out, "shards")) and complete_shards(out):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()  # killed mid-build
    assert 1 <= len(FrameCache(out)) < 8
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cache = FrameCache(out)
    assert len(cache) == 8
    for k in range(8):
        path = str(videos / f"c{k}.mp4")
        assert_same(loads(path, None, None, True, None, k), loads(path, None, None, True, cache, k))
    assert cache.hits == 8


def test_datasets_read_the_cache(tmp_path):
    paths = make_synthetic_dataset(str(tmp_path / "ds"), num_train=4, num_test=3, seed=1, size=32, workers=1)
    out = str(tmp_path / "cache")
    assert cache_main(["--out", out, "--videos", paths["features_path"], "--size", "32"]) == 0
    args = dict(datatype="msrvtt", max_words=16, max_frames=4, image_resolution=32, **{
        k: paths[k] for k in ("train_csv", "val_csv", "data_path", "features_path")})
    from modules.tokenizer import SimpleTokenizer, write_bpe_vocab

    tok = SimpleTokenizer(write_bpe_vocab(["a red square moves left then up"], str(tmp_path / "b.txt.gz"), 20))
    for build in (build_train_dataset, build_test_dataset):
        plain, cached = build(Namespace(**args), tok), build(Namespace(**args, frame_cache=out), tok)
        view_p, view_c = (plain, cached) if build is build_train_dataset else (plain.video_dataset(),
                                                                               cached.video_dataset())
        for i in range(len(view_p)):
            torch.manual_seed(i)
            p = view_p[i]
            torch.manual_seed(i)
            c = view_c[i]
            assert torch.equal(p["video"], c["video"]) and torch.equal(p["video_mask"], c["video_mask"])
        assert cached.video_options["frame_cache"].hits == len(view_p)
    with pytest.raises(FrameCacheError, match="224 px"):
        build_test_dataset(Namespace(**dict(args, image_resolution=224), frame_cache=out), tok)
    with pytest.raises(FrameCacheError, match="--video_decoder"):
        build_test_dataset(Namespace(**args, frame_cache=out, video_decoder="pyav"), tok)
    with pytest.raises(FrameCacheError, match="no frame_cache.json"):
        build_test_dataset(Namespace(**args, frame_cache=str(tmp_path)), tok)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cache_main(["--out", str(tmp_path / "c"), "--videos", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err
    listing = tmp_path / "list.txt"
    listing.write_text("a.mp4 1\n")
    with pytest.raises(SystemExit):
        cache_main(["--out", str(tmp_path / "c"), "--video_list", str(listing)])
    assert "list.txt line 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_world(tmp_path_factory):
    """A synthetic MSR-VTT-layout dataset, a tiny 32 px CLIP and its BPE, for main.py runs with a cache."""
    import json

    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import get_tokenizer, write_bpe_vocab

    root = tmp_path_factory.mktemp("cache_runs")
    paths = make_synthetic_dataset(str(root / "data"), num_train=8, num_test=4, seed=2, size=32, min_frames=8,
                                   max_frames=10, workers=1)
    with open(paths["data_path"]) as f:
        captions = [s["caption"] for s in json.load(f)["sentences"]]
    bpe = write_bpe_vocab(captions, str(root / "pre" / "bpe.txt.gz"), num_merges=60)
    torch.manual_seed(0)
    torch.save(CLIP(tiny_clip_config(vocab_size=get_tokenizer(bpe_path=bpe).vocab_size)).state_dict(),
               str(root / "pre" / "tiny.pt"))
    flags = ["--datatype", "msrvtt", "--pretrained_dir", str(root / "pre"), "--pretrained_clip_name", "tiny.pt",
             "--bpe_path", bpe, "--max_words", "12", "--max_frames", "3", "--shared_latent_space", "linear",
             "--unified_transformer_layers", "1", "--batch_size", "4", "--batch_size_val", "4", "--epochs", "1",
             "--lr", "1e-3", "--device", "cpu", "--no_progress", "--no_tensorboard", "--seed", "0",
             "--cpu_tuning", "0",  # the runs test the cache's counts, not the kernels a timing would choose
             "--num_thread_reader", "2"]  # two loader worker processes: the counts come back with the batches
    for key in ("train_csv", "val_csv", "data_path", "features_path"):
        flags += ["--" + key, paths[key]]
    return paths, flags


def _main_run(flags, out):
    import json

    r = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *flags, "--output_dir", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), (out / "log.txt").read_text()


def test_a_cache_that_serves_nothing_says_so_and_every_run_counts_its_hits(run_world, tmp_path):
    """--frame_cache built with --frames eval used for training, or for another --max_frames: one warning at
    start-up naming the setting, and every pass's hits and misses (across two loader worker processes) in
    the log and results.json; a cache that fits serves every clip."""
    paths, flags = run_world
    evaluation_cache, full_cache = str(tmp_path / "eval4"), str(tmp_path / "all")
    assert cache_main(["--out", evaluation_cache, "--videos", paths["features_path"], "--size", "32",
                       "--frames", "eval", "--max_frames", "4"]) == 0
    assert cache_main(["--out", full_cache, "--videos", paths["features_path"], "--size", "32"]) == 0
    train = ["--do_train", "1", "--do_eval", "0"]

    res, log = _main_run(flags + train + ["--frame_cache", evaluation_cache], tmp_path / "mismatch")
    warnings = [line for line in log.splitlines() if "does not fit" in line]
    assert len(warnings) == 2, log  # the training split and the test split, each at start-up
    assert "training" in warnings[0] and "built with --frames eval" in warnings[0] and "--frames all" in warnings[0]
    assert ("--max_frames 4 and this run takes --max_frames 3" in warnings[1]
            and "build it with --max_frames 3" in warnings[1])
    entry = res["evaluations"][-1]
    # 2 steps of 4 samples from two workers; random frames fall on the cached evaluation frames only by chance
    hits = entry["train_frame_cache"]["hits"]
    assert hits < 8 and entry["train_frame_cache"] == {"hits": hits, "misses": 8 - hits}
    assert f"frame cache, epoch 1 training: {hits} of 8 clips from the cache, {8 - hits} read from their files" in log
    assert entry["frame_cache"] == {"hits": 0, "misses": 4}  # the 4 test videos: other evaluation frames
    assert ("WARNING dgl: frame cache, evaluation: 0 of 4 clips from the cache, 4 read from their files (the cache "
            "served nothing") in log

    res, log = _main_run(flags + train + ["--frame_cache", full_cache], tmp_path / "fits")
    assert "does not fit" not in log and "served nothing" not in log
    entry = res["evaluations"][-1]
    assert entry["train_frame_cache"] == {"hits": 8, "misses": 0} and entry["frame_cache"] == {"hits": 4, "misses": 0}
    assert "frame cache, epoch 1 training: 8 of 8 clips from the cache, 0 read from their files" in log


def test_why_a_cache_serves_none_names_the_setting(clips, raw_cache, tmp_path):
    cache = FrameCache(raw_cache)  # --frames all, max_frames T
    assert cache.why_it_does_not_fit(clips, True, T, "x") is None
    assert cache.why_it_does_not_fit(clips, False, T + 5, "x") is None  # every frame serves any evaluation
    other = str(tmp_path / "other.mp4")
    write_video(other, textured(6, 32, 32, 9), fps=3.0)
    assert "none of their files is in the cache" in cache.why_it_does_not_fit([(other, None, None)], False, T, "x")
    evaluation = str(tmp_path / "eval")
    build_frame_cache(evaluation, clips, frames="eval", max_frames=T, size=SIZE, log=None)
    cache = FrameCache(evaluation)
    assert cache.why_it_does_not_fit(clips, False, T, "x") is None
    assert "--frames eval" in cache.why_it_does_not_fit(clips[:3], True, T, "x")  # the long clips: all frames needed
    assert f"--max_frames {T} and this run takes --max_frames {T - 2}" in cache.why_it_does_not_fit(
        clips[:3], False, T - 2, "x")


def test_cache_and_checkpoint_paths_of_the_wrong_kind_one_line(tmp_path, capsys):
    """--out / --frame_cache given a file, --out given a folder of other files (a run folder), --resume or
    --init_checkpoint given a folder: one line saying what the path is, status 2, nothing written."""
    from training.config import build_parser, validate

    videos = tmp_path / "videos"
    write_video(str(videos / "a.mp4"), textured(6, 32, 32, 5), fps=3.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}\n")
    for out, expected in ((run / "results.json", "is a file, not a folder"),
                          (run, "holds other files and no frame_cache.json")):
        with pytest.raises(SystemExit) as e:
            cache_main(["--out", str(out), "--videos", str(videos), "--size", "32"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert sorted(os.listdir(run)) == ["results.json"] and (run / "results.json").read_text() == "{}\n"
    with pytest.raises(FrameCacheError, match="results.json: a file, not a folder"):
        FrameCache(str(run / "results.json"))
    parser = build_parser()
    for flag in ("--resume", "--init_checkpoint"):
        with pytest.raises(SystemExit) as e:
            validate(parser.parse_args(["--output_dir", str(tmp_path / "o"), "--do_train", "1", flag, str(run)]),
                     parser)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and f"{flag} {run} is a folder; give its checkpoint file" in err, err
