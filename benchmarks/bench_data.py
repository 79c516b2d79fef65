"""Clips per second for 12-frame sampling: our sparse loader against decode-every-frame-then-sample.

    python benchmarks/bench_data.py [--video_dir DIR] [--num_videos 24] [--seconds 10] [--repeats 3]

Without ``--video_dir`` it writes ``--num_videos`` clips of ``--seconds`` s at 3 fps, 224 px short side
(398x224, moving shapes over a textured background, x264 defaults) in a temporary folder. Both methods
run in the same process, on the same files, in alternation, and return the same uint8 frames:

* ours: ``dataloaders.video.read_frames`` (decord ``get_batch`` of the sampled indices only);
* decode-all (the published approach): decode every frame of the video in order, keep them all, then
  index the sampled ones.

Prints clips/s of each and the ratio (best of ``--repeats`` timings per video).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataloaders.video import open_video, read_frames, sample_eval_indices  # noqa: E402
from preprocess.ffmpeg_tools import write_video  # noqa: E402


def make_videos(directory: str, num_videos: int, seconds: float, fps: float = 3.0, height: int = 224,
                width: int = 398, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * fps)))
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(num_videos):
        texture = (rng.integers(0, 60, size=(height // 8 + 1, width // 8 + 1, 3))
                   .repeat(8, 0).repeat(8, 1)[:height, :width]).astype(np.uint8)
        frames = np.empty((n, height, width, 3), np.uint8)
        colour = rng.integers(80, 255, size=3).astype(np.uint8)
        for t in range(n):
            frames[t] = np.roll(texture, shift=2 * t, axis=1)
            cx, cy = (40 + 10 * t + 7 * i) % width, (60 + 5 * t) % height
            frames[t][(np.abs(xx - cx) < 30) & (np.abs(yy - cy) < 30)] = colour
        paths.append(write_video(os.path.join(directory, f"clip{i}.mp4"), frames, fps=fps, crf=23))
    return paths


def decode_all_then_sample(path: str, max_frames: int) -> torch.Tensor:
    reader = open_video(path)
    frames = [reader.next().asnumpy() for _ in range(len(reader))]  # every frame, in order
    idx = sample_eval_indices(len(frames), max_frames)
    return torch.from_numpy(np.stack([frames[i] for i in idx]))


def pyav_decode_all_then_sample(path: str, max_frames: int) -> torch.Tensor:
    """The published decoder (PyAV): decode every frame, convert the sampled ones."""
    import av

    with av.open(path) as container:
        frames = list(container.decode(video=0))
    idx = sample_eval_indices(len(frames), max_frames)
    return torch.from_numpy(np.stack([frames[i].to_rgb().to_ndarray() for i in idx]))


def ours(path: str, max_frames: int) -> torch.Tensor:
    return read_frames(path, max_frames, train=False)[0]


def best_times(fns, paths, max_frames, repeats) -> list[float]:
    """Per method, the sum over videos of the best of ``repeats`` timings; the methods alternate on
    each video, so load from other processes hits both alike."""
    totals = [0.0] * len(fns)
    for p in paths:
        best = [float("inf")] * len(fns)
        for _ in range(repeats):
            for k, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn(p, max_frames)
                best[k] = min(best[k], time.perf_counter() - t0)
        totals = [a + b for a, b in zip(totals, best)]
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video_dir", default=None, help="folder of 3 fps, 224 px videos (default: generate)")
    ap.add_argument("--num_videos", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max_frames", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if a.video_dir:
            paths = sorted(os.path.join(a.video_dir, f) for f in os.listdir(a.video_dir) if f.endswith(".mp4"))
        else:
            paths = make_videos(tmp, a.num_videos, a.seconds)
        if not paths:
            print("no videos found", file=sys.stderr)
            return 1
        first = paths[0]
        if not torch.equal(ours(first, a.max_frames), decode_all_then_sample(first, a.max_frames)):
            print("the two methods disagree on the frames", file=sys.stderr)
            return 1
        n_frames = len(open_video(first))
        fns, names = [ours, decode_all_then_sample], ["ours (sparse get_batch)", "decode all then sample"]
        try:
            import av  # noqa: F401  optional: the published decoder
            fns.append(pyav_decode_all_then_sample)
            names.append("PyAV decode all (published)")
        except ImportError:
            pass
        times = best_times(fns, paths, a.max_frames, a.repeats)
        cps = [len(paths) / t for t in times]
        print(f"{len(paths)} videos, {n_frames} frames each (first), {a.max_frames}-frame sampling, "
              f"best of {a.repeats} per video, methods alternating")
        for name, c in zip(names, cps):
            print(f"{name:28s}: {c:8.1f} clips/s")
        print(f"ratio ours / decode-all: {cps[0] / cps[1]:.2f}x")
        if len(cps) > 2:
            print(f"ratio ours / PyAV decode-all: {cps[0] / cps[2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
