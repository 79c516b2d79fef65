"""The data path against the published one, bit for bit on the model input.

The published loader (spec section 5) is re-implemented here from its description, sharing nothing with
``dataloaders/``: PyAV decodes every frame, the container's frame count and average rate cut clips,
TSN-style sampling picks the frames, and the transform is /255, torchvision's CenterCrop (zero padding
where a side is under the input size, offsets rounded with Python's round) and CLIP's mean/std in
place. Videos are generated with ffmpeg in several sizes: larger than the input both ways, smaller on
one side or both, and odd differences (225x301: one row to crop, rounded to even).
"""
from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders.video import DECODERS, load_video, normalize_frames, read_frames
from preprocess.ffmpeg_tools import find_ffmpeg

av = pytest.importorskip("av")

REPO = Path(__file__).resolve().parents[1]

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------- the published path
def ref_decode(path):
    """Every decoded frame (PyAV), the container's frame count and its average frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        listed, fps = stream.frames, float(stream.average_rate)
        frames = list(container.decode(video=0))
    return frames, listed, fps


def ref_clip(frames, listed, fps, start, end):
    """The frames the published loader keeps for a clip, and the count it samples from."""
    if start is None or end is None:
        kept = frames
    else:
        start, end = int(start), int(end)
        start = start if start >= 0 else 0
        end = end if end >= 0 else 0
        if start > end:
            start, end = end, start
        elif start == end:
            end = end + 1
        lo, hi = max(0, int(start * fps)), min(int(end * fps), listed)
        kept = [f for i, f in enumerate(frames) if lo <= i <= hi]
    return kept, min(listed, len(kept))


def ref_eval_indices(count, n):
    if n > count:
        tick = n / float(count)
        return [int(tick / 2.0 + tick * x) for x in range(count)]
    return np.clip(np.arange(count), 0, n - 1).tolist()


def ref_train_indices(count, n, offsets):
    """TSN segments with the random offsets given (the published code draws them with numpy)."""
    seg = n // count
    if seg > 0:
        return (np.arange(count) * seg + np.asarray(offsets)).tolist()
    return np.clip(np.arange(count), 0, n - 1).tolist()


def ref_transform(images, size):
    """List of HWC uint8 arrays -> (T, 3, size, size): /255, CenterCrop (pad, then crop), normalise."""
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).contiguous().float().div_(255) for im in images])
    t, c, h, w = x.shape
    if h < size or w < size:
        left, top = max(size - w, 0) // 2, max(size - h, 0) // 2
        right, bottom = (max(size - w, 0) + 1) // 2, (max(size - h, 0) + 1) // 2
        canvas = torch.zeros(t, c, h + top + bottom, w + left + right)
        canvas[:, :, top:top + h, left:left + w] = x
        x = canvas
        h, w = x.shape[-2:]
    if (h, w) != (size, size):
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        x = x[:, :, top:top + size, left:left + size]
    mean = torch.as_tensor(MEAN, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(STD, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def ref_load(path, count, size, start=None, end=None, offsets=None):
    """The published model input ``(count, 3, size, size)`` and mask ``(count,)`` of a video."""
    frames, listed, fps = ref_decode(path)
    kept, n = ref_clip(frames, listed, fps, start, end)
    idx = ref_eval_indices(count, n) if offsets is None else ref_train_indices(count, n, offsets)
    video = ref_transform([kept[i].to_rgb().to_ndarray() for i in idx], size)
    mask = torch.tensor([1] * min(n, count) + [0] * (count - min(n, count)))
    return video, mask


# ---------------------------------------------------------------------------------------------- videos
def pattern(num_frames, height, width, seed=0):
    """Smooth gradients moving with time plus noise: every pixel position and frame differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for k in range(num_frames):
        out[k, ..., 0] = (3 * xx + 7 * k) % 256
        out[k, ..., 1] = (2 * yy + 11 * k) % 256
        out[k, ..., 2] = (xx + yy + 40 * k) % 256
    noise = rng.integers(0, 24, out.shape, dtype=np.uint8)
    return out // 2 + noise


def encode(path, frames, fps=3.0):
    """H.264 mp4; 4:4:4 chroma when a side is odd (4:2:0 needs even sizes)."""
    t, h, w, _ = frames.shape
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    cmd = [find_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", pix_fmt, "-crf", "20", "-threads", "1",
           "-an", str(path)]
    subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True, capture_output=True)
    return str(path)


# width x height: larger both ways, smaller on one side, smaller on both, odd differences (225: crop offset
# round(0.5) = 0; 301: round(38.5) = 38; 201: 23 columns of padding, 11 left and 12 right; 227: round(1.5) = 2)
VIDEO_SIZES = [(301, 225), (225, 301), (240, 200), (200, 240), (398, 224), (160, 120), (224, 224), (201, 227)]


@functools.lru_cache(maxsize=None)
def ref_eval_input(path, count, size):
    """``ref_load`` of whole videos, cached: both decoders are compared with the same reference."""
    return ref_load(path, count, size)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for i, (w, h) in enumerate(VIDEO_SIZES):
        out[(w, h)] = encode(root / f"v{w}x{h}.mp4", pattern(13 + i, h, w, seed=i))
    out["short"] = encode(root / "short.mp4", pattern(5, 230, 250, seed=9))
    return out


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("hw", [(225, 301), (301, 225), (240, 200), (200, 240), (224, 398), (120, 160), (224, 224),
                                (223, 225), (31, 47), (47, 31), (20, 33), (33, 33), (32, 32)])
def test_transform_bit_exact(hw, size):
    frames = torch.from_numpy(pattern(3, *hw, seed=hw[0]))
    want = ref_transform(list(frames.numpy()), size)
    got = normalize_frames(frames, size)
    assert got.shape == (3, 3, size, size) and got.is_contiguous()
    assert torch.equal(got, want)


def test_padding_is_zero_before_normalisation():
    frames = torch.full((1, 200, 230, 3), 255, dtype=torch.uint8)  # 24 rows short of 224: 12 on top, 12 below
    x = normalize_frames(frames, 224)
    pad = -torch.tensor(MEAN) / torch.tensor(STD)
    assert torch.allclose(x[0, :, :12, 0], pad.view(3, 1).expand(3, 12))
    assert torch.allclose(x[0, :, 212:, 100], pad.view(3, 1).expand(3, 12))
    assert torch.allclose(x[0, :, 12:212, 3], ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(3, 1).expand(3, 200))
    odd = normalize_frames(torch.full((1, 199, 230, 3), 255, dtype=torch.uint8), 224)  # 25 rows: 12 top, 13 below
    assert torch.allclose(odd[0, 0, 11], pad[0].expand(224)) and not torch.allclose(odd[0, 0, 12], pad[0].expand(224))
    assert torch.allclose(odd[0, 0, 210], torch.tensor((1 - MEAN[0]) / STD[0]).expand(224))
    assert torch.allclose(odd[0, 0, 211], pad[0].expand(224))  # rows 211..223: 13 padded rows


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("key", VIDEO_SIZES + ["short"])
def test_eval_input_bit_exact(videos, key, decoder):
    path = videos[key]
    want, want_mask = ref_eval_input(path, 12, 224)
    got, mask, _ = load_video(path, 12, 224, train=False, decoder=decoder)
    assert torch.equal(mask, want_mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize("decoder", DECODERS)
def test_train_input_bit_exact(videos, decoder):
    """Training draws its segment offsets from torch (the published code from numpy): with the offsets
    replayed, the frames, crop and normalisation are the published ones."""
    path = videos[(225, 301)]  # 14 frames, 4 segments of 3
    offsets = torch.randint(3, (4,), generator=torch.Generator().manual_seed(5)).tolist()
    want, want_mask = ref_load(path, 4, 224, offsets=offsets)
    got, mask, _ = load_video(path, 4, 224, train=True, generator=torch.Generator().manual_seed(5), decoder=decoder)
    assert torch.equal(got, want) and torch.equal(mask, want_mask)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("start,end", [(2, 4), (2.7, 4.9), (4.2, 2.1), (3.5, 3.9), (-1.5, 2), (0, 127), (4, 4)])
def test_clip_times_bit_exact(videos, decoder, start, end):
    """int seconds, negative -> 0, swapped, end + 1 when equal; frames int(start * fps) .. int(end * fps)
    inclusive, capped by the frame count (the 15-frame video lasts 5 s at 3 fps)."""
    path = videos[(240, 200)]
    want, want_mask = ref_load(path, 4, 224, start=start, end=end)
    got, mask, _ = load_video(path, 4, 224, train=False, start=start, end=end, decoder=decoder)
    assert torch.equal(got, want) and torch.equal(mask, want_mask)


def test_pyav_decoder_exact_on_an_open_gop_file(tmp_path):
    """B-pyramid with open GOPs: decord's sparse reads can return the neighbouring frame there
    (``benchmarks/bench_data.py --mode decoders``); the PyAV decoder gives the published frames."""
    path = tmp_path / "open_gop.mp4"
    frames = pattern(120, 64, 80, seed=4)
    cmd = [find_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "80x64", "-r", "30",
           "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-threads", "1", "-bf", "8",
           "-x264-params", "b-pyramid=normal:open-gop=1:keyint=24", "-an", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)
    want, want_mask = ref_load(path, 64, 64)
    got, mask, _ = load_video(path, 64, 64, train=False, decoder="pyav")
    assert torch.equal(got, want) and torch.equal(mask, want_mask)


def test_clip_past_the_end_is_a_clear_error(videos):
    from dataloaders.video import VideoDecodeError

    with pytest.raises(VideoDecodeError, match="starts at frame 60 but the video has 15 frames"):
        read_frames(videos[(240, 200)], 4, train=False, start=20, end=30)


def test_resize_short_side_is_an_opt_in(videos):
    path = videos[(398, 224)]
    published, _, _ = load_video(path, 12, 112, train=False)
    resized, _, _ = load_video(path, 12, 112, train=False, resize_short_side=True)
    assert torch.equal(published, ref_eval_input(path, 12, 112)[0])
    assert not torch.equal(published, resized)


# ---------------------------------------------------------------------------------------------- datasets with clip times
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from modules.tokenizer import SimpleTokenizer, write_bpe_vocab

    path = tmp_path_factory.mktemp("bpe") / "bpe.txt.gz"
    return SimpleTokenizer(write_bpe_vocab(["a man cooks food", "a dog runs in a park"], str(path), num_merges=20))


def clip_args(data, videos_dir, **kw):
    base = dict(data_path=str(data), features_path=str(videos_dir), max_words=16, max_frames=5, image_resolution=32,
                feature_framerate=1, slice_framepos=2, train_frame_order=0, eval_frame_order=0, skip_bad_videos=False)
    base.update(kw)
    return Namespace(**base)


@pytest.mark.parametrize("decoder", DECODERS)
def test_activitynet_clip_as_published(tmp_path, tokenizer, decoder):
    """ActivityNet: the paragraph spans [0, ceil(duration)] s; here the file runs past the annotated
    duration (30 frames at 2 fps = 15 s, duration 9.2 s -> frames 0..20)."""
    from dataloaders.activitynet import ActivityNetDataset

    vids = tmp_path / "videos"
    vids.mkdir()
    encode(vids / "abc.mp4", pattern(30, 48, 40, seed=1), fps=2.0)  # decord fails on some tiny widths (48, 24)
    encode(vids / "xyz.mp4", pattern(7, 24, 40, seed=2), fps=2.0)  # shorter than its duration
    (tmp_path / "val_ids.json").write_text(json.dumps(["v_abc", "v_xyz"]))
    (tmp_path / "val_1.json").write_text(json.dumps({
        "v_abc": {"duration": 9.2, "timestamps": [[0, 4], [4, 9]], "sentences": ["a man cooks", "food"]},
        "v_xyz": {"duration": 5.5, "timestamps": [[0, 5]], "sentences": ["a dog runs"]}}))
    ds = ActivityNetDataset(clip_args(tmp_path, vids, video_decoder=decoder), tokenizer, "test", eval_sampling=True)
    view = ds.video_dataset()
    for i, (name, duration) in enumerate((("abc", 9.2), ("xyz", 5.5))):
        want, want_mask = ref_load(vids / f"{name}.mp4", 5, 32, start=0, end=int(math.ceil(duration)))
        item = view[i]
        assert torch.equal(item["video"], want) and torch.equal(item["video_mask"], want_mask)
    frames, _ = read_frames(vids / "abc.mp4", 30, train=False, start=0, end=10, decoder=decoder)
    assert torch.equal(frames[20], frames[-1]) and not torch.equal(frames[19], frames[20])  # 21 real frames


@pytest.mark.parametrize("decoder", DECODERS)
def test_didemo_clip_as_published(tmp_path, tokenizer, decoder):
    """DiDeMo: the first 31 s (frames 0..62 at 2 fps) of a 40 s video."""
    from dataloaders.didemo import DiDeMoDataset

    vids = tmp_path / "videos"
    vids.mkdir()
    encode(vids / "clip1.mp4", pattern(80, 36, 30, seed=3), fps=2.0)
    (tmp_path / "test_list.txt").write_text("clip1.mp4\n")
    (tmp_path / "test_data.json").write_text(json.dumps([
        {"video": "clip1.mp4", "description": "a man cooks", "times": [[0, 1]]},
        {"video": "clip1.mp4", "description": "a dog runs", "times": [[2, 3]]}]))
    ds = DiDeMoDataset(clip_args(tmp_path, vids, video_decoder=decoder), tokenizer, "test", eval_sampling=True)
    want, want_mask = ref_load(vids / "clip1.mp4", 5, 32, start=0, end=31)
    item = ds.video_dataset()[0]
    assert torch.equal(item["video"], want) and torch.equal(item["video_mask"], want_mask)
    everything, _ = ref_load(vids / "clip1.mp4", 5, 32)
    assert not torch.equal(item["video"], everything)  # the cut changes the sampled frames


# ---------------------------------------------------------------------------------------------- main.py end to end
EVAL_VIDEOS = {  # name: (width, height, frames); the tiny CLIP's input is 32 x 32
    "wide": (40, 24, 7),    # smaller than the input on one side (padded rows), larger on the other
    "large": (64, 48, 9),   # larger both ways
    "odd": (33, 47, 6),     # odd differences: crop offsets rounded
    "narrow": (30, 36, 3),  # fewer frames than --max_frames: the last one repeats
}


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """Generated mp4s in the MSR-VTT test layout, a tiny CLIP in the OpenAI layout and a BPE vocabulary."""
    from modules.clip import CLIP, tiny_clip_config
    from modules.tokenizer import get_tokenizer, write_bpe_vocab

    root = tmp_path_factory.mktemp("eval_parity")
    (root / "videos").mkdir()
    captions = {"wide": "a red car drives by", "large": "a man cooks food in a kitchen",
                "odd": "a dog runs in a park", "narrow": "people dance on a stage"}
    rows = ["key,vid_key,video_id,sentence"]
    for i, (name, (w, h, n)) in enumerate(EVAL_VIDEOS.items()):
        encode(root / "videos" / f"{name}.mp4", pattern(n, h, w, seed=20 + i))
        rows.append(f"ret{i},msr{i},{name},{captions[name]}")
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    bpe = write_bpe_vocab(list(captions.values()), str(root / "bpe.txt.gz"), num_merges=60)
    torch.manual_seed(0)
    clip_cfg = tiny_clip_config(vocab_size=get_tokenizer(bpe_path=bpe).vocab_size)
    torch.save(CLIP(clip_cfg).state_dict(), root / "tiny.pt")
    return root, bpe, list(captions.values())


def official_checkpoint(path, clip_path, latent):
    """A trained-looking DGL (random prompts, non-zero biases) saved as the published code saves it."""
    from modules.dgl import DGL

    torch.manual_seed(3)
    model = DGL.from_pretrained(str(clip_path), shared_latent_space=latent, max_words=12, max_frames=4,
                                unified_transformer_layers=2).eval()
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 5, "global_step": 100, "arch": "DGL", "best_acc1": 40.0, "optimizer": {},
                "state_dict": state}, path)
    return model


def oracle_similarity(model, root, bpe, captions):
    """The published evaluation: published pixels (PyAV, this file's transform), the published-style
    computation (``reference/published.py``), exp(logit_scale) * cosine."""
    from reference import published
    from modules.tokenizer import tokenize

    video = torch.stack([ref_load(root / "videos" / f"{name}.mp4", 4, 32)[0] for name in EVAL_VIDEOS])
    ids = tokenize(captions, max_words=12, bpe_path=bpe)
    with torch.no_grad():
        t = published.encode_text(model, ids)
        v = published.encode_video(model, video)  # (B, T, 3, 32, 32) -> (B, D)
        t, v = t / t.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
        return (model.clip.logit_scale.exp() * t @ v.t()).numpy()


@pytest.mark.parametrize("latent,decoder", [("linear", "decord"), ("transformer", "decord"),
                                            pytest.param("transformer", "pyav", marks=pytest.mark.slow)])
def test_main_eval_gives_the_published_similarity_matrix(eval_setup, tmp_path, latent, decoder):
    root, bpe, captions = eval_setup
    ckpt = tmp_path / "ckpt.best.pth.tar"
    model = official_checkpoint(ckpt, root / "tiny.pt", latent)
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "main.py"), "--do_eval", "1", "--resume", str(ckpt), "--datatype", "msrvtt",
           "--val_csv", str(root / "test.csv"), "--features_path", str(root / "videos"),
           "--pretrained_dir", str(root), "--pretrained_clip_name", "tiny.pt", "--bpe_path", bpe,
           "--shared_latent_space", latent, "--unified_transformer_layers", "2", "--max_words", "12",
           "--max_frames", "4", "--batch_size_val", "3", "--num_thread_reader", "0", "--device", "cpu",
           "--video_decoder", decoder, "--no_progress", "--no_tensorboard", "--save_sim_matrix",
           "--output_dir", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out / "msrvtt_sim_matrix.npy")
    want = oracle_similarity(model, root, bpe, captions)
    assert got.shape == want.shape == (4, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.abs(want - want.mean()).max() > 0.05  # the matrix is not flat: a wrong input would show
