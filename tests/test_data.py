"""Video data pipeline: sampling, decoding, pixels, annotation parsing, bad input, DataLoader."""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import pickle
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders import (DATASETS, AnnotationError, BadVideoError, ReplacementCounter, build_test_dataset,
                         build_train_dataset)
from dataloaders.base import describe_replacements
from dataloaders.lsmdc import movie_of_clip
from dataloaders.video import (CLIP_MEAN, CLIP_STD, VideoDecodeError, apply_frame_order, load_video,
                               normalize_frames, read_frames, read_unique_frames, sample_eval_indices,
                               sample_train_indices, time_to_frame_range)
from preprocess.ffmpeg_tools import find_ffmpeg, write_video
from preprocess.make_synthetic_dataset import make_specs, make_synthetic_dataset, positions, render_clip

ANNOTATIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "annotations"
needs_annotations = pytest.mark.skipif(not ANNOTATIONS.is_dir(), reason=f"real annotations not found at {ANNOTATIONS}")

NUM_TRAIN, NUM_TEST = 6, 4


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(str(root), num_train=NUM_TRAIN, num_test=NUM_TEST, seed=3, size=32, workers=2)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from modules.tokenizer import SimpleTokenizer, write_bpe_vocab

    path = tmp_path_factory.mktemp("bpe") / "bpe.txt.gz"
    texts = ["a red square moves left then up", "the blue circle goes down and then right",
             "a triangle in green moving up first and left after"]
    return SimpleTokenizer(write_bpe_vocab(texts, str(path), num_merges=40))


def gray_video(path, num_frames, height=32, width=64):
    """Frame k is gray level 10k+5, except that the left half of the red channel is 255."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for k in range(num_frames):
        frames[k] = 10 * k + 5
    frames[:, :, : width // 2, 0] = 255
    return write_video(str(path), frames, fps=3.0, crf=0)


@pytest.fixture(scope="session")
def gray20(tmp_path_factory):
    return gray_video(tmp_path_factory.mktemp("gray") / "gray20.mp4", 20)


def msrvtt_args(paths, **kw):
    base = dict(datatype="msrvtt", train_csv=paths["train_csv"], val_csv=paths["val_csv"],
                data_path=paths["data_path"], features_path=paths["features_path"], max_words=16, max_frames=4,
                feature_framerate=1, expand_msrvtt_sentences=False, slice_framepos=2, train_frame_order=0,
                eval_frame_order=0, image_resolution=32, skip_bad_videos=False)
    base.update(kw)
    return Namespace(**base)


# ---------------------------------------------------------------------------------------------- sampling
def test_eval_sampling_hand_computed():
    # 20 frames, 12 segments of 5/3 frames: int(5/6 + 5/3 t)
    assert sample_eval_indices(20, 12) == [0, 2, 4, 5, 7, 9, 10, 12, 14, 15, 17, 19]
    # 30 frames (10 s at 3 fps): ticks of 2.5, centres 1.25, 3.75, ...
    assert sample_eval_indices(30, 12) == [1, 3, 6, 8, 11, 13, 16, 18, 21, 23, 26, 28]
    assert sample_eval_indices(12, 12) == list(range(12))  # exact
    assert sample_eval_indices(5, 12) == [0, 1, 2, 3, 4] + [4] * 7  # short: last frame repeated
    assert sample_eval_indices(1, 3) == [0, 0, 0]


def test_train_sampling_segments_and_padding():
    g = torch.Generator().manual_seed(7)
    expected_offsets = torch.randint(2, (12,), generator=torch.Generator().manual_seed(7)).tolist()
    got = sample_train_indices(30, 12, generator=g)
    assert got == [2 * t + o for t, o in enumerate(expected_offsets)]  # segments of 30 // 12 = 2 frames
    seen = set()
    for _ in range(200):
        idx = sample_train_indices(30, 12)
        assert all(2 * t <= i <= 2 * t + 1 for t, i in enumerate(idx))
        seen.update(idx)
    assert seen == set(range(24))  # frames 24..29 lie past the last segment, as published
    assert sample_train_indices(12, 12) == list(range(12))
    assert sample_train_indices(5, 12) == [0, 1, 2, 3, 4] + [4] * 7
    with pytest.raises(ValueError):
        sample_train_indices(0, 12)


def test_frame_order_and_time_range():
    assert apply_frame_order([0, 2, 4, 4], 3, 0) == [0, 2, 4, 4]
    assert apply_frame_order([0, 2, 4, 4], 3, 1) == [4, 2, 0, 0]
    shuffled = apply_frame_order(list(range(8)), 8, 2, torch.Generator().manual_seed(0))
    assert sorted(shuffled) == list(range(8)) and shuffled != list(range(8))
    with pytest.raises(ValueError):
        apply_frame_order([0, 1], 2, 3)
    assert time_to_frame_range(30, 3.0, None, None) == (0, 29)
    assert time_to_frame_range(30, 3.0, 2, 4) == (6, 12)
    assert time_to_frame_range(30, 3.0, 0, 127) == (0, 29)  # end past the video is capped
    assert time_to_frame_range(30, 3.0, 4, 2) == (6, 12)  # swapped
    assert time_to_frame_range(30, 3.0, 2.9, 4.7) == (6, 12)  # int seconds, as published
    assert time_to_frame_range(30, 3.0, 3, 3) == (9, 12)  # equal: end + 1 s
    assert time_to_frame_range(30, 3.0, -2, 1) == (0, 3)  # negative -> 0


# ---------------------------------------------------------------------------------------------- decoding
def green_levels(frames):
    return frames[..., 1].float().mean(dim=(1, 2))


def test_decoded_frames_match_known_pixels(gray20):
    frames, mask = read_frames(gray20, 12, train=False)
    assert frames.shape == (12, 32, 64, 3) and frames.dtype == torch.uint8
    expected = torch.tensor([10 * i + 5 for i in sample_eval_indices(20, 12)], dtype=torch.float32)
    assert torch.allclose(green_levels(frames), expected, atol=3)
    assert mask.tolist() == [1] * 12
    # RGB order and orientation: left half has red 255, right half is gray
    assert frames[0, 10, 5, 0] >= 245 and frames[0, 10, 60, 0] <= 10


def test_short_video_is_padded_and_masked(gray20):
    frames, mask = read_frames(gray20, 24, train=True)
    assert mask.tolist() == [1] * 20 + [0] * 4
    expected = torch.tensor([10 * i + 5 for i in list(range(20)) + [19] * 4], dtype=torch.float32)
    assert torch.allclose(green_levels(frames), expected, atol=3)


def test_reverse_order_and_clip_times(gray20):
    frames, mask = read_frames(gray20, 4, train=False, frame_order=1)
    expected = torch.tensor([10 * i + 5 for i in [17, 12, 7, 2]], dtype=torch.float32)  # 20/4: 2, 7, 12, 17
    assert torch.allclose(green_levels(frames), expected, atol=3)
    # [2 s, 4 s] at 3 fps = frames 6..12 (7 frames), 4 centres of ticks 1.75: 6, 8, 10, 12
    frames, _ = read_frames(gray20, 4, train=False, start=2.0, end=4.0)
    assert torch.allclose(green_levels(frames), torch.tensor([65.0, 85.0, 105.0, 125.0]), atol=3)


def test_train_sampling_reads_the_sampled_frames(gray20):
    torch.manual_seed(0)
    expected = sample_train_indices(20, 6)
    torch.manual_seed(0)
    frames, _ = read_frames(gray20, 6, train=True)
    assert torch.allclose(green_levels(frames), torch.tensor([10.0 * i + 5 for i in expected]), atol=3)


def test_normalize_crop_resize():
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    frames = torch.zeros(2, 32, 64, 3, dtype=torch.uint8)
    frames[..., :32, 0] = 255  # left half red
    out = normalize_frames(frames, 32)  # short side already 32: center crop columns 16..47
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[0, 0, :, :16], (1 - mean[0]) / std[0])
    assert torch.allclose(out[0, 0, :, 16:], (0 - mean[0]) / std[0])
    assert torch.allclose(out[0, 1], (0 - mean[1]) / std[1])
    uniform = torch.full((1, 48, 80, 3), 128, dtype=torch.uint8)
    out = normalize_frames(uniform, 16, resize_short_side=True)  # opt-in: resize 48x80 -> 16x27, crop 16x16
    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(out[0, :, 5, 5], (128 / 255 - mean) / std, atol=1e-4)
    ramp = torch.arange(80, dtype=torch.uint8).view(1, 1, 80, 1).expand(1, 48, 80, 3).contiguous()
    assert torch.equal(normalize_frames(ramp, 16)[0, 0, 0], (torch.arange(32, 48) / 255.0 - mean[0]) / std[0])
    assert not torch.equal(normalize_frames(ramp, 16, resize_short_side=True), normalize_frames(ramp, 16))


def test_normalize_crop_first_matches_reference():
    """Cropping the uint8 frames before the float conversion gives exactly the reference
    (x / 255 - mean) / std of the center crop of the whole float frame."""
    frames = torch.randint(0, 256, (3, 32, 50, 3), dtype=torch.uint8)
    x = frames.permute(0, 3, 1, 2).float()[..., :, 9:41]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = normalize_frames(frames, 32)
    assert out.is_contiguous() and torch.equal(out, (x / 255.0 - mean) / std)
    tall = torch.randint(0, 256, (2, 50, 32, 3), dtype=torch.uint8)  # portrait: crop rows 9..40
    assert torch.equal(normalize_frames(tall, 32), normalize_frames(tall[:, 9:41].contiguous(), 32))


@pytest.mark.parametrize("max_frames,frame_order,train", [(4, 0, False), (4, 1, False), (6, 2, True),
                                                          (24, 0, True), (24, 1, False)])
def test_unique_frames_are_decoded_once(gray20, max_frames, frame_order, train):
    decoded, take, mask, _ = read_unique_frames(gray20, max_frames, train, frame_order=frame_order,
                                             generator=torch.Generator().manual_seed(1))
    assert decoded.shape[0] == len(set(take)) == min(20, max_frames) and len(take) == max_frames
    levels = green_levels(decoded)
    assert torch.all(levels[1:] > levels[:-1])  # distinct frames, in file order
    frames, mask2 = read_frames(gray20, max_frames, train, frame_order=frame_order,
                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(frames, decoded[take]) and torch.equal(mask, mask2)
    video, mask3, _ = load_video(gray20, max_frames, 32, train, frame_order=frame_order,
                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(video, normalize_frames(frames, 32)) and torch.equal(mask, mask3)


def test_short_keyframe_interval_reads_the_same_frames(tmp_path):
    """Sparse reads that seek between keyframes return the same pixels as a single-GOP file."""
    frames = np.zeros((30, 32, 64, 3), np.uint8)
    for k in range(30):
        frames[k] = 8 * k + 5
    one_gop = write_video(str(tmp_path / "g0.mp4"), frames, fps=3.0, crf=0)
    short_gop = write_video(str(tmp_path / "g3.mp4"), frames, fps=3.0, crf=0, keyint=3)
    a, _ = read_frames(one_gop, 12, train=False)
    b, _ = read_frames(short_gop, 12, train=False)
    assert torch.equal(a, b)
    expected = torch.tensor([8.0 * i + 5 for i in sample_eval_indices(30, 12)])
    assert torch.allclose(green_levels(b), expected, atol=2)


def test_synthetic_video_pixels_and_motion(synthetic):
    spec = make_specs(NUM_TRAIN, NUM_TEST, seed=3, size=32)[0]
    path = os.path.join(synthetic["features_path"], spec.video_id + ".mp4")
    frames, mask = read_frames(path, spec.num_frames, train=False)
    assert mask.sum() == spec.num_frames
    rendered = torch.from_numpy(render_clip(spec)).float()
    assert (frames.float() - rendered).abs().mean() < 6
    pos = positions(spec)
    half = spec.num_frames // 2
    d = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    first = pos[half - 1] - pos[0]
    second = pos[-1] - pos[half - 1]
    assert np.sign(first).tolist() == [float(v) for v in d[spec.first]]
    assert np.sign(second).tolist() == [float(v) for v in d[spec.second]]


# ---------------------------------------------------------------------------------------------- datasets
def test_synthetic_layout_and_determinism(synthetic, tmp_path):
    with open(synthetic["val_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["video_id"] for r in rows] == [f"video{NUM_TRAIN + j}" for j in range(NUM_TEST)]
    assert len({r["sentence"] for r in rows}) == NUM_TEST  # distinct test captions
    data = json.load(open(synthetic["data_path"]))
    assert len(data["sentences"]) == 3 * (NUM_TRAIN + NUM_TEST)
    assert len(os.listdir(synthetic["features_path"])) == NUM_TRAIN + NUM_TEST
    assert make_specs(NUM_TRAIN, NUM_TEST, seed=3, size=32) == make_specs(NUM_TRAIN, NUM_TEST, seed=3, size=32)
    assert make_specs(NUM_TRAIN, NUM_TEST, seed=3, size=32) != make_specs(NUM_TRAIN, NUM_TEST, seed=4, size=32)
    cap = data["sentences"][0]["caption"]
    spec = make_specs(NUM_TRAIN, NUM_TEST, seed=3, size=32)[0]
    assert cap == f"a {spec.colour} {spec.shape} moves {spec.first} then {spec.second}"


def test_msrvtt_train_and_test_samples(synthetic, tokenizer):
    train = build_train_dataset(msrvtt_args(synthetic), tokenizer)
    assert len(train) == NUM_TRAIN  # one random caption per video
    s = train[1]
    assert set(s) == {"input_ids", "video", "video_mask", "index", "replaced"}
    assert s["input_ids"].shape == (16,) and s["input_ids"].dtype == torch.long
    assert s["input_ids"][0] == tokenizer.sot_token_id
    assert s["video"].shape == (4, 3, 32, 32) and s["video"].dtype == torch.float32
    assert s["video_mask"].tolist() == [1, 1, 1, 1] and s["index"] == 1 and s["replaced"] is False
    expanded = build_train_dataset(msrvtt_args(synthetic, expand_msrvtt_sentences=True), tokenizer)
    assert len(expanded) == 3 * NUM_TRAIN

    test = build_test_dataset(msrvtt_args(synthetic), tokenizer)
    assert (test.num_videos, test.num_captions) == (NUM_TEST, NUM_TEST)
    assert test.caption_video_index.tolist() == list(range(NUM_TEST))
    t = test.text_dataset()[2]
    assert t["caption_index"] == 2 and t["input_ids"].shape == (16,)
    v = test.video_dataset()[3]
    assert v["video_index"] == 3 and v["video"].shape == (4, 3, 32, 32) and v["replaced"] is False
    # eval sampling is deterministic
    assert torch.equal(test.video_dataset()[3]["video"], v["video"])


def test_training_split_as_evaluation_set(synthetic, tokenizer):
    """The QB-norm query bank: the training split with every caption and segment-centre frames."""
    bank = build_test_dataset(msrvtt_args(synthetic), tokenizer, split="train")
    train = build_train_dataset(msrvtt_args(synthetic), tokenizer)
    assert (bank.num_videos, bank.num_captions) == (NUM_TRAIN, 3 * NUM_TRAIN)
    assert bank.caption_video_index.tolist() == train.caption_video_index.tolist()
    first = bank.video_dataset()[1]["video"]
    assert torch.equal(bank.video_dataset()[1]["video"], first)  # deterministic: segment centres
    torch.manual_seed(0)
    draws = [train[1]["video"] for _ in range(4)]  # training: random offsets
    assert any(not torch.equal(d, draws[0]) for d in draws[1:])
    with pytest.raises(ValueError, match="split"):
        build_test_dataset(msrvtt_args(synthetic), tokenizer, split="dev")


def test_dataloader_with_two_workers(synthetic, tokenizer):
    ds = build_train_dataset(msrvtt_args(synthetic, expand_msrvtt_sentences=True), tokenizer)
    loader = DataLoader(ds, batch_size=6, num_workers=2, shuffle=True)
    batches = list(loader)
    assert len(batches) == 3
    b = batches[0]
    assert b["video"].shape == (6, 4, 3, 32, 32) and b["input_ids"].shape == (6, 16)
    assert b["video_mask"].shape == (6, 4) and b["replaced"].dtype == torch.bool
    assert sorted(torch.cat([x["index"] for x in batches]).tolist()) == list(range(18))


# ---------------------------------------------------------------------------------------------- real annotations
@needs_annotations
def test_real_msrvtt_annotations(tmp_path):
    test = build_test_dataset(Namespace(datatype="msrvtt", val_csv=str(ANNOTATIONS / "msrvtt" / "MSRVTT_JSFUSION_test.csv"),
                                        features_path=str(tmp_path)), None)
    assert (test.num_captions, test.num_videos) == (1000, 1000)
    assert test.caption_video_index.tolist() == list(range(1000))
    assert test.videos[0].video_id == "video9770" and test.videos[0].path == str(tmp_path / "video9770.mp4")
    assert test.captions[0] == "a person is connecting something to system"
    for name, count in [("MSRVTT_train.9k.csv", 9000), ("MSRVTT_train.7k.csv", 7010)]:
        ids = [r["video_id"] for r in csv.DictReader(open(ANNOTATIONS / "msrvtt" / name))]
        sentences = [{"video_id": v, "caption": f"caption {v}"} for v in ids]
        (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
        train = build_train_dataset(Namespace(datatype="msrvtt", train_csv=str(ANNOTATIONS / "msrvtt" / name),
                                              data_path=str(tmp_path), features_path=str(tmp_path)), None)
        assert train.num_videos == count and len(train) == count


@needs_annotations
def test_real_lsmdc_annotations(tmp_path):
    ds = build_test_dataset(Namespace(datatype="lsmdc", data_path=str(ANNOTATIONS / "lsmdc"),
                                      features_path=str(tmp_path)), None)
    assert (ds.num_videos, ds.num_captions) == (1000, 1000)
    clip = "3086_UGLY_TRUTH_00.23.23.000-00.23.28.886"
    assert ds.videos[0].video_id == clip and ds.captions[0] == "SOMEONE stands below, hands on her hips."
    assert ds.videos[0].path == str(tmp_path / "3086_UGLY_TRUTH" / (clip + ".avi"))
    assert movie_of_clip("1054_Harry_Potter_and_the_prisoner_of_azkaban_01.44.29.000-01.44.31.167") == \
        "1054_Harry_Potter_and_the_prisoner_of_azkaban"


@needs_annotations
def test_real_activitynet_reports_ids_without_annotation(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = build_test_dataset(Namespace(datatype="activity", data_path=str(ANNOTATIONS / "activitynet"),
                                          features_path=str(tmp_path)), None, split="val")
    assert ds.num_videos == ds.num_captions == 4917
    assert len(ds.ids_without_annotation) == 4926 - 4917
    assert "v_4G2jW3hbiO4" in ds.ids_without_annotation
    assert any("9 of 4926 ids" in r.getMessage() and "v_4G2jW3hbiO4" in r.getMessage() for r in caplog.records)
    val = json.load(open(ANNOTATIONS / "activitynet" / "val_1.json"))
    first = ds.videos[0].video_id
    assert ds.captions[0] == " ".join(val[first]["sentences"])  # paragraph = sentences joined
    assert ds.videos[0].path == str(tmp_path / (first[2:] + ".mp4"))


@needs_annotations
def test_real_msvd_lists(tmp_path):
    counts = {}
    for split, name in [("train", "train_list.txt"), ("val", "val_list.txt"), ("test", "test_list.txt")]:
        ids = (ANNOTATIONS / "msvd" / name).read_text().split()
        counts[split] = ids
    data = tmp_path / "msvd"
    data.mkdir()
    for name in ("train_list.txt", "val_list.txt", "test_list.txt"):
        (data / name).write_text((ANNOTATIONS / "msvd" / name).read_text())
    caps = {v: [["a", "man", "sings"], ["someone", "sings", v]] for ids in counts.values() for v in ids}
    with open(data / "raw-captions.pkl", "wb") as f:
        pickle.dump(caps, f)
    args = Namespace(datatype="msvd", data_path=str(data), features_path=str(tmp_path))
    train = build_train_dataset(args, None)
    test = build_test_dataset(args, None)
    assert (train.num_videos, len(train)) == (1200, 2400)
    assert (test.num_videos, test.num_captions) == (670, 1340)
    assert build_test_dataset(args, None, split="val").num_videos == 100
    assert test.captions[0] == "a man sings" and test.caption_video_index[:4].tolist() == [0, 0, 1, 1]


# ---------------------------------------------------------------------------------------------- other formats
def test_vatex_and_didemo_formats(tmp_path):
    (tmp_path / "train_list.txt").write_text("vidA\nvidB\n")
    (tmp_path / "test_list.txt").write_text("vidC\n")
    (tmp_path / "ref_captions.json").write_text(json.dumps(
        {"vidA": ["a", "b", "c"], "vidB": ["d"], "vidC": ["e", "f"]}))
    args = Namespace(datatype="vatex", data_path=str(tmp_path), features_path=str(tmp_path))
    train = build_train_dataset(args, None)
    assert len(train) == 4 and train.caption_video_index.tolist() == [0, 0, 0, 1]
    test = build_test_dataset(args, None)
    assert (test.num_videos, test.num_captions, test.multi_sentence_per_video) == (1, 2, True)

    d = tmp_path / "didemo"
    d.mkdir()
    (d / "test_list.txt").write_text("x.mov\ny.3gp\nz.mp4\n")
    (d / "test_data.json").write_text(json.dumps([
        {"video": "x.mov", "description": "one", "times": [[0, 0]]},
        {"video": "y.3gp", "description": "two", "times": [[1, 1]]},
        {"video": "x.mov", "description": "three", "times": [[2, 3]]}]))
    (d / "y.mp4").write_bytes(b"")  # compressed name: extension replaced by .mp4
    ds = build_test_dataset(Namespace(datatype="didemo", data_path=str(d), features_path=str(d)), None)
    assert ds.captions == ["one three", "two"] and ds.ids_without_annotation == ["z.mp4"]
    assert ds.videos[1].path == str(d / "y.mp4") and (ds.videos[0].start, ds.videos[0].end) == (0.0, 31.0)
    assert set(DATASETS) == {"msrvtt", "vatex", "lsmdc", "activity", "msvd", "didemo", "custom"}


def test_annotation_errors_at_startup(tmp_path, synthetic):
    bad_csv = tmp_path / "test.csv"
    bad_csv.write_text("key,video_id\nret0,video1\n")
    with pytest.raises(AnnotationError, match=r"test\.csv: missing column\(s\) \['sentence'\]"):
        build_test_dataset(msrvtt_args(synthetic, val_csv=str(bad_csv)), None)
    unknown = tmp_path / "train.csv"
    unknown.write_text("video_id\nvideo0\nvideo_nope\n")
    with pytest.raises(AnnotationError, match="video_nope"):
        build_train_dataset(msrvtt_args(synthetic, train_csv=str(unknown)), None)
    with pytest.raises(AnnotationError, match="not found"):
        build_train_dataset(msrvtt_args(synthetic, data_path=str(tmp_path / "none.json")), None)
    (tmp_path / "train_list.txt").write_text("vidA\nvidQ\n")
    (tmp_path / "ref_captions.json").write_text(json.dumps({"vidA": ["a"]}))
    with pytest.raises(AnnotationError, match="vidQ"):
        build_train_dataset(Namespace(datatype="vatex", data_path=str(tmp_path), features_path=""), None)
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text("clip_a\t1\t2\t3\t4\tok\nclip_b\t1\t2\n")
    with pytest.raises(AnnotationError, match="line 2: expected 6"):
        build_test_dataset(Namespace(datatype="lsmdc", data_path=str(tmp_path), features_path=""), None)
    with pytest.raises(ValueError, match="datatype"):
        build_train_dataset(Namespace(datatype="nope"), None)


# ---------------------------------------------------------------------------------------------- bad videos
@pytest.fixture()
def broken_dataset(tmp_path, synthetic):
    """A copy of the synthetic train set where video1 is replaced by a broken file."""
    import shutil

    videos = tmp_path / "videos"
    shutil.copytree(synthetic["features_path"], videos)
    return dict(synthetic, features_path=str(videos))


def make_bad(kind, path, good):
    if kind == "missing":
        os.remove(path)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "truncated":
        data = open(good, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "undecodable":
        # bytes that are no container at all; seeded, since some random bytes read as a file with no video
        # stream, which is reported as such
        open(path, "wb").write(random.Random(0).randbytes(4096))
    elif kind == "zero_frames":
        import subprocess

        subprocess.run([find_ffmpeg(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=red:s=32x32:r=3",
                        "-t", "1", "-frames:v", "0", "-c:v", "libx264", "-f", "mp4", path], check=True)


@pytest.mark.parametrize("kind,reason", [("missing", "file not found"), ("empty", "empty file"),
                                         ("truncated", "undecodable or truncated"),
                                         ("undecodable", "undecodable or truncated"),
                                         ("zero_frames", "zero frames")])
def test_bad_video_error_names_file_and_row(broken_dataset, tokenizer, kind, reason):
    path = os.path.join(broken_dataset["features_path"], "video1.mp4")
    make_bad(kind, path, os.path.join(broken_dataset["features_path"], "video0.mp4"))
    ds = build_train_dataset(msrvtt_args(broken_dataset), tokenizer)
    with pytest.raises(BadVideoError) as info:
        ds[1]
    msg = str(info.value)
    assert path in msg and reason in msg
    assert "item 1" in msg and "MSRVTT_train.9k.csv line 3" in msg
    assert isinstance(info.value.__cause__, VideoDecodeError)


def test_skip_bad_videos_replaces_and_counts(broken_dataset, tokenizer, caplog):
    path = os.path.join(broken_dataset["features_path"], "video1.mp4")
    make_bad("undecodable", path, None)
    ds = build_train_dataset(msrvtt_args(broken_dataset, skip_bad_videos=True), tokenizer)
    with caplog.at_level(logging.WARNING):
        s = ds[1]
    assert s["replaced"] is True and s["index"] == 1 and s["video_mask"].sum() == 4
    assert any(path in r.getMessage() for r in caplog.records)
    # the replacement is the next readable video, video2: the caption is one of video2's captions
    data = json.load(open(broken_dataset["data_path"]))
    from modules.tokenizer import tokenize

    video2_ids = [tokenize(c["caption"], 16, tokenizer=tokenizer)[0] for c in data["sentences"]
                  if c["video_id"] == "video2"]
    assert any(torch.equal(s["input_ids"], t) for t in video2_ids)
    assert ds[0]["replaced"] is False
    counter = ReplacementCounter()
    for batch in DataLoader(ds, batch_size=3, num_workers=0):
        counter.update(batch)
    assert (counter.replaced, counter.seen) == (1, NUM_TRAIN)
    assert describe_replacements(counter.replaced, counter.seen, "epoch 1") == (
        logging.WARNING, "epoch 1: 1 of 6 training samples had an unreadable video and were replaced")

    test_ds = build_test_dataset(msrvtt_args(broken_dataset, skip_bad_videos=True), tokenizer)
    assert test_ds.video_dataset()[0]["replaced"] is False


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_load_video_reports_what_it_read(gray20, decoder):
    """load_video returns the file's frame count, rate and the frames it used, from its one read."""
    video, mask, info = load_video(gray20, 6, 32, train=False, decoder=decoder)
    assert info.num_frames == 20
    assert info.fps == pytest.approx(3.0)
    assert info.duration == pytest.approx(20 / 3)
    assert list(info.frame_indices) == sample_eval_indices(20, 6)
    assert video.shape == (6, 3, 32, 32) and int(mask.sum()) == 6


def test_search_encoder_opens_each_file_once(gray20, monkeypatch):
    import dataloaders.video as video_module
    from retrieval.encode import read_for_model

    opened = []
    real_open = video_module.open_video
    monkeypatch.setattr(video_module, "open_video", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    _, _, meta = read_for_model(str(gray20), 4, 32)
    assert opened == [str(gray20)]
    assert meta["num_frames"] == 20 and meta["duration"] == pytest.approx(20 / 3, abs=1e-3)
    assert meta["frames_used"] == sample_eval_indices(20, 4)
