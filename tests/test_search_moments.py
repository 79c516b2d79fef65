"""Time ranges in the search index: window and shot boundaries, merging of ranked ranges, PySceneDetect
cuts on a video with known cuts, range features equal to the evaluation path's, resume and failures per
range, and the index refusing what would change a feature (model checkpoint, pixels, segmentation)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dataloaders.video import load_video
from retrieval import VideoIndex
from retrieval.segments import (Segmentation, detect_shot_boundaries, format_range, merge_and_split, merge_ranked,
                                plan_ranges, window_ranges)
from tests.search_fixtures import CONFIG, make_world, one_line_error, run_cli, write_shots_video

LENGTHS = [4, 5, 4, 3]           # seconds per shot: cuts at 4, 9, 13; 16 s in all
CUTS = [4.0, 9.0, 13.0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moments"))
    w = make_world(root)
    w.long_video, _ = write_shots_video(os.path.join(root, "long", "long.mp4"), LENGTHS)
    return w


@pytest.fixture(scope="module")
def loaded(world):
    return world.model()


def common(world):
    return [*world.model_args(), "--workers", 0, "--precision", "fp32", "--no_progress"]


# ------------------------------------------------------------------------------------ boundaries by hand
def test_window_ranges_by_hand():
    assert window_ranges(25.3, 8, 4) == [(0, 8), (4, 12), (8, 16), (12, 20), (16, 24), (20, 26)]
    assert window_ranges(8.0, 8, 4) == [(0, 8)]
    assert window_ranges(3.2, 8, 4) == [(0, 4)]
    assert window_ranges(10.0, 4, 4) == [(0, 4), (4, 8), (8, 10)]


def test_shots_merged_and_split_by_hand():
    # cuts round to 1, 6, 6, 30: shots 0-1 (too short: joins 1-6), 6-30 (24 s: 3 parts), 30-42 (2 parts)
    got = merge_and_split([1.2, 5.9, 6.4, 30.0], 41.5, min_len=2, max_len=10)
    assert got == [(0, 6), (6, 14), (14, 22), (22, 30), (30, 36), (36, 42)]
    assert merge_and_split([10.0], 11.0, min_len=2, max_len=20) == [(0, 11)]   # a short last shot joins the one before
    assert merge_and_split([], 25.0, min_len=2, max_len=10) == [(0, 9), (9, 17), (17, 25)]  # longer parts first
    assert merge_and_split([0.2, 24.9], 25.0, min_len=2, max_len=30) == [(0, 25)]      # cuts at the ends dropped


def test_merge_ranked_by_hand():
    cands = [(0.9, 0, "a", 10, 18), (0.8, 1, "b", 0, 8), (0.7, 2, "a", 18, 26), (0.6, 3, "a", 40, 48),
             (0.5, 4, "b", 30, 38), (0.4, 5, "a", 26, 30)]
    # the best 3 segments; a 18-26 touches a 10-18 (both rank): one range with the best score
    ranges, exhausted = merge_ranked(iter(cands), k=3)
    assert [(r["path"], r["start"], r["end"], r["score"], r["rows"]) for r in ranges] == [
        ("a", 10, 26, 0.9, [0, 2]), ("b", 0, 8, 0.8, [1])]
    assert not exhausted
    # k = 4 takes a 40-48 as well; a 26-30 (ranked 6th) does not grow the first range
    ranges, exhausted = merge_ranked(iter(cands), k=4)
    assert [(r["path"], r["start"], r["end"], r["rows"]) for r in ranges] == [
        ("a", 10, 26, [0, 2]), ("b", 0, 8, [1]), ("a", 40, 48, [3])]
    # at most one range per video: neighbours still merge, new ranges of a full video are skipped, uncounted
    ranges, exhausted = merge_ranked(iter(cands), k=4, per_video=1)
    assert [(r["path"], r["start"], r["end"], r["rows"]) for r in ranges] == [("a", 10, 30, [0, 2, 5]),
                                                                              ("b", 0, 8, [1])]
    assert not exhausted                      # 4 segments were taken
    assert merge_ranked(iter(cands), k=5, per_video=1)[1]  # the candidates ran out first
    # a segment between two ranked ones joins all three, with the best score
    ranges, _ = merge_ranked(iter([(0.5, 0, "a", 0, 4), (0.9, 1, "a", 8, 12), (0.7, 2, "a", 4, 8)]), k=5)
    assert [(r["start"], r["end"], r["score"]) for r in ranges] == [(0, 12, 0.9)]
    # k = 1 is the best segment alone, even with ranked neighbours
    ranges, _ = merge_ranked(iter([(0.9, 1, "a", 8, 12), (0.7, 2, "a", 4, 8)]), k=1)
    assert [(r["start"], r["end"], r["rows"]) for r in ranges] == [(8, 12, [1])]
    # whole files: one range each
    ranges, _ = merge_ranked(iter([(0.5, 0, "a", None, None), (0.4, 1, "b", None, None)]), k=1)
    assert [(r["path"], r["start"]) for r in ranges] == [("a", None)]
    assert format_range(751, 767) == "12:31-12:47" and format_range(3723, 3725) == "1:02:03-1:02:05"


def test_scenedetect_finds_the_known_cuts(world, monkeypatch):
    import retrieval.segments as segments

    found = detect_shot_boundaries(world.long_video)
    assert len(found) == len(CUTS) and all(abs(f - c) <= 0.2 for f, c in zip(found, CUTS)), found
    monkeypatch.setattr(segments, "_scenedetect_backend", lambda: "pyav")  # where OpenCV is not installed
    assert detect_shot_boundaries(world.long_video) == pytest.approx(found, abs=0.21)
    monkeypatch.undo()
    seg = Segmentation(mode="shots", min_len=2, max_len=10, scales=1)
    assert plan_ranges(seg, world.long_video, 16.0) == [(0, 4), (4, 9), (9, 13), (13, 16)]
    assert plan_ranges(Segmentation(mode="shots", min_len=5, max_len=10, scales=1), world.long_video,
                       16.0) == [(0, 9), (9, 16)]
    assert plan_ranges(Segmentation(mode="auto", whole_up_to=20), world.long_video, 16.0) == [(None, None)]


def test_short_shots_of_a_low_frame_rate_video_are_found(tmp_path):
    """Shots of 2 s at 3 fps are 6 frames: the detector's shortest shot is half a second, not 15 frames."""
    path, cuts = write_shots_video(str(tmp_path / "slow.mp4"), [2, 2, 3, 2], fps=3)
    found = detect_shot_boundaries(path)
    assert len(found) == len(cuts) == 3 and all(abs(f - c) <= 0.34 for f, c in zip(found, cuts)), (found, cuts)


# ------------------------------------------------------------------------------------ the index
def test_range_entries_are_the_evaluation_features(world, loaded, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    code, out, err = run_cli(["index", world.long_video, "--index", idx, "--segments", "shots", "--min_len", 2,
                              "--max_len", 10, "--ranges", "seconds", "--scales", 1, *common(world)], capsys)
    assert code == 0, err
    assert "4 entries of 1 videos (--segments shots --min_len 2 --max_len 10" in out
    index = VideoIndex.open(idx)
    assert [(e["start"], e["end"], e["segment"]) for e in index.entries] == [
        (0, 4, [0, 4]), (4, 9, [1, 4]), (9, 13, [2, 4]), (13, 16, [3, 4])]
    meta = json.load(open(os.path.join(idx, "index.json")))
    assert meta["segmentation"]["mode"] == "shots" and meta["sampling"]["decoder"] == "decord"
    assert meta["sampling"]["resize_short_side"] is False
    model = loaded.model
    for e, feature in zip(index.entries, index.features()):
        clip = load_video(world.long_video, CONFIG["max_frames"], 32, train=False, start=e["start"], end=e["end"])
        assert list(clip.info.frame_indices[: int(clip.mask.sum())]) == e["frames_used"]
        with torch.no_grad():
            expected = torch.nn.functional.normalize(model.encode_video(clip.video[None], clip.mask[None]), dim=-1)
        torch.testing.assert_close(feature[None], expected, atol=1e-5, rtol=1e-5)
    # query: k = 1 is the best range alone; with k above the 4 ranges all rank and, touching, merge
    text = VideoIndex.open(idx, model=model, tokenizer=loaded.tokenizer).encode_texts(["a red square"])[0]
    raw = index.features() @ text
    best = int(raw.argmax())
    code, out, err = run_cli(["query", "a red square", "--index", idx, "-k", 1, "--json", "-", "--device", "cpu"],
                             capsys)
    assert code == 0, err
    hit = json.loads(out)[0]["results"][0]
    e = index.entries[best]
    assert (hit["start"], hit["end"], hit["segments"], hit["path"]) == (e["start"], e["end"], 1, world.long_video)
    assert hit["score"] == pytest.approx(float(raw[best]), abs=1e-5) and hit["range"] == format_range(e["start"], e["end"])
    code, out, err = run_cli(["query", "a red square", "--index", idx, "-k", 10, "--json", "-", "--device", "cpu"],
                             capsys)
    hits = json.loads(out)[0]["results"]
    assert len(hits) == 1 and (hits[0]["start"], hits[0]["end"], hits[0]["segments"]) == (0, 16, 4)
    assert hits[0]["range"] == "0:00-0:16" and hits[0]["score"] == pytest.approx(float(raw.max()), abs=1e-5)
    code, out, err = run_cli(["query", "a red square", "--index", idx, "-k", 1, "--device", "cpu", "--html",
                              tmp_path / "page.html"], capsys)
    assert code == 0 and format_range(e["start"], e["end"]) in out.splitlines()[2] and world.long_video in out
    page = (tmp_path / "page.html").read_text()
    assert f'<span class="range">{format_range(e["start"], e["end"])}</span>' in page
    assert f'<video controls preload="metadata" src="file://{world.long_video}#t={e["start"]},{e["end"]}"' in page


def test_mismatches_refused_in_one_line(world, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert run_cli(["index", world.long_video, "--index", idx, "--segments", "windows", "--window", 4, "--stride", 4,
                    "--ranges", "seconds", "--scales", 1, *common(world)], capsys)[0] == 0
    before = sorted(os.listdir(idx / "shards")), (idx / "index.json").read_bytes()
    one_line_error(["index", world.videos, "--index", idx, "--segments", "shots", *common(world)], capsys,
                   "built with --segments windows --window 4 --stride 4", "asks for --segments shots")
    one_line_error(["index", world.videos, "--index", idx, "--stride", 2, *common(world)], capsys,
                   "--stride 4", "--stride 2")
    one_line_error(["index", world.videos, "--index", idx, "--resize_short_side", 1, *common(world)], capsys,
                   "--resize_short_side False", "True")
    one_line_error(["index", world.videos, "--index", idx, "--video_decoder", "pyav", *common(world)], capsys,
                   "--video_decoder 'decord'", "'pyav'")
    assert (sorted(os.listdir(idx / "shards")), (idx / "index.json").read_bytes()) == before  # nothing touched
    # without the flags, an update takes the recorded segmentation
    code, out, err = run_cli(["index", world.videos, "--index", idx, *common(world)], capsys)
    assert code == 0, err
    entries = VideoIndex.open(str(idx)).entries
    assert {(e["start"], e["end"]) for e in entries if e["path"] == world.long_video} == {(0, 4), (4, 8), (8, 12),
                                                                                        (12, 16)}
    for path in {e["path"] for e in entries} - {world.long_video}:
        got = sorted((e["start"], e["end"]) for e in entries if e["path"] == path)
        assert got == window_ranges(next(e["duration"] for e in entries if e["path"] == path), 4, 4)


def test_index_without_checkpoint_refused(world, tmp_path, capsys):
    idx = tmp_path / "idx"
    one_line_error(["index", world.long_video, "--index", idx, "--clip", world.clip, "--bpe_path", world.bpe,
                    "--device", "cpu"], capsys, "needs --checkpoint", "ckpt.best.pth.tar")
    assert not idx.exists()


def test_killed_run_resumes_range_by_range(world, loaded, tmp_path):
    seg = Segmentation(mode="windows", window=4, stride=2, scales=1)
    kw = dict(precision="fp32", shard_size=2, batch_size=2, log=None, segmentation=seg)
    full = VideoIndex.build(loaded.model, [world.long_video], index_dir=str(tmp_path / "full"), **kw)
    assert len(full) == 7  # 0-4, 2-6, ..., 12-16

    class Killed(Exception):
        pass

    def kill(path):
        raise Killed(path)

    with pytest.raises(Killed):
        VideoIndex.build(loaded.model, [world.long_video], index_dir=str(tmp_path / "resumed"), on_shard=kill, **kw)
    assert len(VideoIndex.open(str(tmp_path / "resumed"))) == 2
    shards = []
    VideoIndex.build(loaded.model, [world.long_video], index_dir=str(tmp_path / "resumed"), on_shard=shards.append,
                     **kw)
    assert len(shards) == 3  # the 5 missing ranges only
    a, b = VideoIndex.open(str(tmp_path / "full")), VideoIndex.open(str(tmp_path / "resumed"))
    key = lambda e: e["start"]  # noqa: E731
    assert sorted(a.entries, key=key) == sorted(b.entries, key=key)
    fa = dict(zip((e["start"] for e in a.entries), a.features()))
    fb = dict(zip((e["start"] for e in b.entries), b.features()))
    assert all(torch.equal(fa[s], fb[s]) for s in fa)


def test_failed_range_listed_then_encoded(world, loaded, tmp_path, monkeypatch):
    import retrieval.encode as encode

    real = encode.read_for_model

    def fail_at_8(path, *args):
        if args[2] == 8:  # start
            raise RuntimeError(f"cannot read video {path}: broken data at 8 s")
        return real(path, *args)

    seg = Segmentation(mode="windows", window=4, stride=4, scales=1)
    idx = str(tmp_path / "idx")
    monkeypatch.setattr(encode, "read_for_model", fail_at_8)
    index = VideoIndex.build(loaded.model, [world.long_video], index_dir=idx, precision="fp32", log=None,
                             segmentation=seg)
    assert [e["start"] for e in index.entries] == [0, 4, 12]
    failed = json.load(open(os.path.join(idx, "failed.json")))
    assert [(f["path"], f["start"], f["end"]) for f in failed] == [(world.long_video, 8, 12)]
    assert "broken data at 8 s" in failed[0]["reason"]
    monkeypatch.setattr(encode, "read_for_model", real)
    calls = []
    VideoIndex.build(loaded.model, [world.long_video], index_dir=idx, precision="fp32", log=None,
                     on_shard=calls.append)
    assert sorted(e["start"] for e in VideoIndex.open(idx).entries) == [0, 4, 8, 12] and len(calls) == 1
    assert json.load(open(os.path.join(idx, "failed.json"))) == []
    # a file that cannot be cut at all is listed without a range, the others are indexed
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    index = VideoIndex.build(loaded.model, [world.long_video, str(junk)], index_dir=str(tmp_path / "idx2"),
                             precision="fp32", log=None, segmentation=seg)
    assert len(index) == 4 and [(f["path"], f["start"]) for f in index.failed] == [(str(junk), None)]
