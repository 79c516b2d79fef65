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
from retrieval.segments import (Segmentation, detect_shot_boundaries, format_range, merge_across_weak_cuts,
                                merge_and_split, merge_ranked, plan_frame_ranges, plan_ranges, suppress_overlaps,
                                window_ranges, with_scales)
from tests.search_fixtures import CONFIG, make_world, one_line_error, run_cli, write_shots_video

LENGTHS = [4, 5, 4, 3]           # seconds per shot: cuts at 4, 9, 13; 16 s in all
CUTS = [4.0, 9.0, 13.0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moments"))
    w = make_world(root)
    w.long_video, _ = write_shots_video(os.path.join(root, "long", "long.mp4"), LENGTHS)
    return w


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


# ------------------------------------------------------------------------------------ frame-accurate ranges
def test_shot_exactly_min_len_long_is_kept():
    # the shot 3-5 is exactly --min_len (2 s) long: a shot of its own, not merged
    assert merge_and_split([3.0, 5.0], 9.0, min_len=2, max_len=10) == [(0, 3), (3, 5), (5, 9)]
    assert merge_across_weak_cuts([(15, 40.0), (25, 30.0)], 45, min_len=10, max_len=50) == [(0, 15), (15, 25), (25, 45)]


def test_short_shot_joins_across_its_weaker_cut():
    # frames: the 8-frame shot 40-48 has a weak cut before it (30) and a strong one after (80): it joins 0-40
    assert merge_across_weak_cuts([(40, 30.0), (48, 80.0)], 100, min_len=10, max_len=100) == [(0, 48), (48, 100)]
    assert merge_across_weak_cuts([(40, 80.0), (48, 30.0)], 100, min_len=10, max_len=100) == [(0, 40), (40, 100)]
    # the first and last shots have one neighbour; the shortest is merged first; long shots are split
    assert merge_across_weak_cuts([(3, 90.0), (97, 90.0)], 100, min_len=10, max_len=100) == [(0, 100)]
    assert merge_across_weak_cuts([(50, 1.0)], 100, min_len=10, max_len=30) == [(0, 25), (25, 50), (50, 75),
                                                                                (75, 100)]
    assert with_scales([(0, 4), (4, 9), (9, 13)], 2) == [(0, 4), (0, 9), (4, 9), (4, 13), (9, 13)]
    assert with_scales([(0, 4), (4, 9)], 3) == [(0, 4), (0, 9), (4, 9)]


def test_exact_frame_span_and_its_errors(world):
    from dataloaders.video import VideoDecodeError, exact_frame_span

    assert exact_frame_span(80, 5.0, 2.6, 5.8) == (13, 16)      # frames 13..28
    assert exact_frame_span(80, 5.0, 13.0, 20.0) == (65, 15)    # cut at the last frame
    with pytest.raises(ValueError, match=r"the range 1-1.05 s is shorter than one frame \(5 fps\)"):
        exact_frame_span(80, 5.0, 1.0, 1.05)
    with pytest.raises(ValueError, match=r"no frames in the range 20-24 s \(frames 100-119; it has 80 frames at 5 fps\)"):
        exact_frame_span(80, 5.0, 20.0, 24.0)
    with pytest.raises(VideoDecodeError) as err:
        load_video(world.long_video, 4, 32, train=False, start=20.0, end=24.0, span_rule="frames")
    assert world.long_video in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.fixture(scope="module")
def uneven(world):
    """Shots of 2.6, 3.2 and 2.2 s at 5 fps: cuts at 2.6 and 5.8 s (frames 13 and 29), 8 s in all."""
    path, cuts = write_shots_video(os.path.join(world.root, "uneven", "uneven.mp4"), [2.6, 3.2, 2.2])
    assert cuts == [2.6, 5.8]
    return path


def test_new_index_encodes_each_range_from_its_own_frames(world, loaded, uneven, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    code, out, err = run_cli(["index", uneven, "--index", idx, "--segments", "shots", "--min_len", 1, "--max_len", 10,
                              "--scales", 2, *common(world)], capsys)
    assert code == 0, err
    assert "(--segments shots --min_len 1 --max_len 10 --shot_threshold 27 --scales 2)" in out
    index = VideoIndex.open(idx)
    assert index.transform["ranges"] == "frames"
    spans = [(e["start"], e["end"]) for e in index.entries]
    assert spans == [(0.0, 2.6), (0.0, 5.8), (2.6, 5.8), (2.6, 8.0), (5.8, 8.0)]
    model = loaded.model
    for e, feature in zip(index.entries, index.features()):
        first, stop = round(e["start"] * 5), round(e["end"] * 5)
        assert first <= min(e["frames_used"]) and max(e["frames_used"]) < stop, e   # only the range's own frames
        clip = load_video(uneven, CONFIG["max_frames"], 32, train=False, start=e["start"], end=e["end"],
                          span_rule="frames")
        assert list(clip.info.frame_indices[: int(clip.mask.sum())]) == e["frames_used"]
        with torch.no_grad():
            expected = torch.nn.functional.normalize(model.encode_video(clip.video[None], clip.mask[None]), dim=-1)
        torch.testing.assert_close(feature[None], expected, atol=1e-5, rtol=1e-5)
    # hits are ranges as indexed, [start, end, score], none overlapping a better one with tIoU >= 0.5
    code, out, err = run_cli(["query", "a red square", "--index", idx, "-k", 5, "--json", "-", "--device", "cpu"],
                             capsys)
    hits = json.loads(out)[0]["results"]
    assert code == 0 and hits and all((h["start"], h["end"]) in spans for h in hits)
    for i, a in enumerate(hits):
        for b in hits[:i]:
            inter = max(0, min(a["end"], b["end"]) - max(a["start"], b["start"]))
            assert inter / (max(a["end"], b["end"]) - min(a["start"], b["start"])) < 0.5, (a, b)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["range"] == format_range(hits[0]["start"], hits[0]["end"]) and "." in format_range(2.6, 5.8)


def test_suppress_overlaps_by_hand():
    cands = [(0.9, 0, "a", 0.0, 2.6), (0.8, 1, "a", 0.0, 5.8), (0.7, 2, "b", 1.0, 3.0), (0.6, 3, "a", 2.6, 5.8),
             (0.5, 4, "a", 1.0, 2.0)]
    ranges, exhausted = suppress_overlaps(iter(cands), k=3)
    # 0-5.8 overlaps 0-2.6 with tIoU 0.45 (< 0.5): kept; 1-2 is inside 0-2.6 (tIoU 0.38): kept as the third
    assert [(r["path"], r["start"], r["end"], r["score"]) for r in ranges] == [
        ("a", 0.0, 2.6, 0.9), ("a", 0.0, 5.8, 0.8), ("b", 1.0, 3.0, 0.7)]
    assert not exhausted
    ranges, _ = suppress_overlaps(iter(cands), k=5, iou=0.3)  # stricter: 0-5.8 and 1-2 are suppressed
    assert [(r["start"], r["end"]) for r in ranges] == [(0.0, 2.6), (1.0, 3.0), (2.6, 5.8)]
    ranges, exhausted = suppress_overlaps(iter(cands), k=5, per_video=1)
    assert [(r["path"], r["start"]) for r in ranges] == [("a", 0.0), ("b", 1.0)] and exhausted


def test_range_label_never_runs_past_the_file():
    assert format_range(13, 17, 16.3) == "0:13-0:16.3"      # a whole-second index's last range ends at ceil
    assert format_range(13, 17, 16.36) == "0:13-0:16.3"     # shown to a tenth, never rounded up past the end
    assert format_range(13, 16, 16.0) == "0:13-0:16" and format_range(2.6, 5.8) == "0:02.6-0:05.8"
    assert format_range(3599.5, 3723.25) == "59:59.5-1:02:03.2"


def test_whole_second_index_label_ends_at_the_file(world, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    code, out, err = run_cli(["index", world.long_video, "--index", idx, "--segments", "windows", "--window", 5,
                              "--stride", 5, "--ranges", "seconds", "--scales", 1, *common(world)], capsys)
    assert code == 0, err
    index = VideoIndex.open(idx)
    last = max(index.entries, key=lambda e: e["start"])
    assert (last["start"], last["end"], last["duration"]) == (15, 16, 16.0)  # 80 frames at 5 fps
    odd, _ = write_shots_video(str(tmp_path / "odd" / "odd.mp4"), [2.6, 3.2, 2.4])  # 8.2 s
    code, out, err = run_cli(["index", odd, "--index", idx, *common(world)], capsys)
    assert code == 0, err
    entries = [e for e in VideoIndex.open(idx).entries if e["path"] == odd]
    assert sorted((e["start"], e["end"]) for e in entries) == [(0, 5), (5, 9)] and entries[0]["duration"] == 8.2
    code, out, err = run_cli(["query", "a green square", "--index", idx, "-k", 20, "--json", "-", "--device", "cpu"],
                             capsys)
    hits = json.loads(out)[0]["results"]
    assert any(h["path"] == odd and h["end"] == 9 for h in hits)
    for h in hits:
        end = h["range"].split("-")[1]
        minutes, seconds = end.split(":")
        assert int(minutes) * 60 + float(seconds) <= h["duration"], h


def test_old_index_works_as_built_and_refuses_the_new_flags(world, loaded, uneven, tmp_path, capsys):
    """An index made before frame-accurate ranges (no "ranges" in its sampling, no "scales" in its
    segmentation) is read, updated and searched in whole seconds; asking it for the new ranges is one line."""
    idx = tmp_path / "old"
    assert run_cli(["index", world.long_video, "--index", idx, "--segments", "shots", "--min_len", 2, "--max_len", 10,
                    "--ranges", "seconds", "--scales", 1, *common(world)], capsys)[0] == 0
    meta = json.loads((idx / "index.json").read_text())
    del meta["sampling"]["ranges"], meta["segmentation"]["scales"]
    (idx / "index.json").write_text(json.dumps(meta))
    before = (idx / "index.json").read_bytes(), sorted(os.listdir(idx / "shards"))
    one_line_error(["index", uneven, "--index", idx, "--ranges", "frames", *common(world)], capsys,
                   "built with --ranges 'seconds'", "'frames'")
    one_line_error(["index", uneven, "--index", idx, "--scales", 2, *common(world)], capsys,
                   "--scales 1", "asks for", "--scales 2")
    assert ((idx / "index.json").read_bytes(), sorted(os.listdir(idx / "shards"))) == before
    code, out, err = run_cli(["index", uneven, "--index", idx, "--min_len", 2, *common(world)], capsys)
    assert code == 0, err
    index = VideoIndex.open(str(idx), model=loaded.model, tokenizer=loaded.tokenizer)
    assert index.transform["ranges"] == "seconds" and index.segmentation.scales == 1
    assert sorted((e["start"], e["end"]) for e in index.entries if e["path"] == uneven) == [(0, 3), (3, 6), (6, 8)]
    # searching merges ranked neighbours as before: with k above the ranges, one hit per video
    hits = index.search(["a red square"], k=20)[0]
    assert sorted((h.path, h.start, h.end) for h in hits) == sorted([(world.long_video, 0, 16), (uneven, 0, 8)])


def test_ranges_without_frames_are_listed_in_one_line(world, loaded, tmp_path, monkeypatch, capsys):
    """A range past the stream's frames and a window shorter than one frame: the file's line in failed.json
    and in the output, the rest indexed."""
    import retrieval.segments as segments
    from preprocess.ffmpeg_tools import write_video

    real = segments.plan_frame_ranges

    def past_the_end(seg, path, num_frames, fps):
        return real(seg, path, num_frames, fps) + ([(20.0, 24.0)] if path == world.long_video else [])

    monkeypatch.setattr(segments, "plan_frame_ranges", past_the_end)
    slow = str(tmp_path / "slow" / "slow.mp4")
    write_video(slow, render_frames(4), fps=0.4)  # one frame every 2.5 s: a 1 s window holds no frame
    idx = str(tmp_path / "idx")
    code, out, err = run_cli(["index", world.long_video, slow, "--index", idx, "--segments", "windows", "--window", 1,
                              "--stride", 1, "--scales", 1, *common(world)], capsys)
    assert code == 0, err
    failed = json.load(open(os.path.join(idx, "failed.json")))
    assert [(f["path"], f["start"]) for f in failed] == [(slow, None), (world.long_video, 20.0)]
    assert "--window 1 / --stride 1 s is shorter than one frame at its 0.4 fps" in failed[0]["reason"]
    assert "the stream has no frames in the range 20-24 s (frames 100-119; it has 80 frames at 5 fps)" in failed[1]["reason"]
    lines = out.splitlines()
    assert any(line.strip().startswith(f"{world.long_video} 0:20-0:24: cannot read video") for line in lines), out
    assert any(line.strip().startswith(f"{slow}: ") and "shorter than one frame" in line for line in lines), out
    assert len(VideoIndex.open(idx)) == 16


def render_frames(n):
    import numpy as np

    return np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)


def test_moment_metrics_by_hand():
    from retrieval.moments import MAP_THRESHOLDS, average_precision, moment_metrics

    assert MAP_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    truths = [[("v", 0.0, 2.0)], [("v", 10.0, 12.0)], [("v", 0.0, 2.0)]]
    preds = [[("v", 0.0, 2.0, 0.9)],
             # the best is in another video (a false positive); the next overlaps with tIoU 2 / 2.4 = 0.83
             [("w", 10.0, 12.0, 0.9), ("v", 10.0, 12.4, 0.8), ("v", 10.0, 12.0, 0.7)],
             [("v", 0.0, 2.0, 0.8), ("v", 0.0, 2.2, 0.9)]]   # ranked by score: 0-2.2 first; a duplicate is an FP
    ap = average_precision(preds[1], truths[1])
    assert list(ap) == pytest.approx([0.5] * 7 + [1 / 3] * 3)  # precision at its recall: 1/2, then 1/3
    assert list(average_precision(preds[2], truths[2])) == pytest.approx([1.0] * 9 + [0.5])  # 0.95: 2 / 2.2 misses
    m = moment_metrics(preds, truths)
    assert m["R1@0.5"] == pytest.approx(2 / 3) and m["R1@0.7"] == pytest.approx(2 / 3)
    assert m["mAP"] == pytest.approx((1.0 + (3.5 + 1.0) / 10 + 9.5 / 10) / 3)
    assert m["mAP@0.5"] == pytest.approx((1 + 0.5 + 1) / 3) and m["mAP@0.75"] == pytest.approx((1 + 0.5 + 1) / 3)
    # three moments, found at ranks 2-4: each recall step takes the best precision at it or beyond (3/4)
    several = [("v", 0.0, 1.0), ("v", 2.0, 3.0), ("v", 4.0, 5.0)]
    found = [("w", 0.0, 1.0, 0.9), ("v", 0.0, 1.0, 0.8), ("v", 2.0, 3.0, 0.7), ("v", 4.0, 5.0, 0.6)]
    assert list(average_precision(found, several)) == pytest.approx([0.75] * 10)
