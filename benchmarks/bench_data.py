"""Clips per second for 12-frame sampling: our sparse loader against the published decode-everything loader.

    python benchmarks/bench_data.py [--video_dir DIR] [--num_videos 24] [--seconds 10] [--keyint 3]
                                    [--rounds 7] [--pyav_threads 1]

Without ``--video_dir`` it renders ``--num_videos`` clips of ``--seconds`` s at 3 fps, 398x224 (224 px
short side; moving shapes over a scrolling texture) and encodes each twice in a temporary folder: with
x264's default GOP (one keyframe every 250 frames, i.e. a single keyframe in a 10 s clip) and with a
keyframe every ``--keyint`` frames (``preprocess/compress_video.py --keyint 3``: one per second). With
``--video_dir`` it measures the ``.mp4`` files of that folder as they are.

Methods, on the same files, in the same process, interleaved (the order rotates from video to video):

* ``ours``: ``dataloaders.video.load_video``: decord opens the file, one ``get_batch`` of the sorted
  distinct sampled indices (decord decodes forward from the last keyframe before each one and
  colour-converts only those), crop on uint8, then float, /255 and CLIP mean/std in place;
* ``published``: our re-statement of the published loader (``RawVideoExtractorpyAV.get_video_data``
  with its val transform): PyAV decodes every frame of the video into a list, the sampled frames are
  converted with ``to_rgb().to_ndarray()``, each becomes a contiguous float CHW tensor /255 of the
  whole frame, they are stacked, center-cropped and normalised in place. Without PyAV
  (``pip install av``) a decord decode-every-frame fallback is used and labelled as such;
* ``decode only``: the same two without the tensor work (uint8 frames out: ``read_frames`` against
  PyAV decode-all + ``to_rgb`` of the sampled frames), to show how much of the ratio is decoding.

Both loaders run single-threaded per clip, as in a DataLoader worker (decord ``num_threads=1``; PyAV
``thread_count=1``; ``--pyav_threads 0`` gives PyAV's own default, which the published code uses).
Each round times every method on every video; clips/s is the median over ``--rounds`` rounds and the
ratio is the median of the per-round ratios, in process CPU time (headline: it counts decord's decoder
thread, and it is what bounds clips/s when DataLoader workers keep every core busy) and in wall time.
On cores shared with other jobs the wall-clock ratio favours decord: its main thread sleeps while its
decoder thread works, and the scheduler favours such waking threads over PyAV's single CPU-bound one
(we measured PyAV at up to 2x its CPU time in wall time there, decord at ~1x), so the wall-clock
ratio is printed but not used as the result. Before timing, the outputs of the two
loaders are compared on the first video (same sampled frames; decord's and PyAV's YUV->RGB conversions
may differ by a few levels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataloaders.video import (CLIP_MEAN, CLIP_STD, center_crop, load_video, open_video,  # noqa: E402
                               read_frames, sample_eval_indices)
from preprocess.ffmpeg_tools import find_ffmpeg, write_video  # noqa: E402

SIZE = 224


# ---------------------------------------------------------------------------------------------- videos
def render(index: int, seconds: float, fps: float = 3.0, height: int = 224, width: int = 398,
           seed: int = 0) -> np.ndarray:
    """uint8 ``(N, H, W, 3)``: a coloured square moving over a scrolling 8x8-block texture."""
    rng = np.random.default_rng((seed, index))
    n = max(1, int(round(seconds * fps)))
    yy, xx = np.mgrid[0:height, 0:width]
    texture = (rng.integers(0, 60, size=(height // 8 + 1, width // 8 + 1, 3))
               .repeat(8, 0).repeat(8, 1)[:height, :width]).astype(np.uint8)
    colour = rng.integers(80, 255, size=3).astype(np.uint8)
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        frames[t] = np.roll(texture, shift=2 * t, axis=1)
        cx, cy = (40 + 10 * t + 7 * index) % width, (60 + 5 * t) % height
        frames[t][(np.abs(xx - cx) < 30) & (np.abs(yy - cy) < 30)] = colour
    return frames


def make_sets(directory: str, num_videos: int, seconds: float, keyint: int) -> dict[str, list[str]]:
    """The same rendered clips encoded with x264's default GOP and with a keyframe every ``keyint``."""
    ffmpeg = find_ffmpeg()
    sets = {"x264 default GOP": [], f"keyint {keyint}": []}
    for name in sets:
        os.makedirs(os.path.join(directory, name.replace(" ", "_")), exist_ok=True)
    for i in range(num_videos):
        frames = render(i, seconds)
        for name, k in zip(sets, (None, keyint)):
            path = os.path.join(directory, name.replace(" ", "_"), f"clip{i}.mp4")
            sets[name].append(write_video(path, frames, fps=3.0, crf=23, keyint=k, ffmpeg=ffmpeg))
    return sets


# ---------------------------------------------------------------------------------------------- methods
_MEAN = torch.tensor(CLIP_MEAN).view(-1, 1, 1)
_STD = torch.tensor(CLIP_STD).view(-1, 1, 1)
PYAV_THREADS = 1


def _pyav_decode_all_and_convert_sampled(path: str, max_frames: int) -> list[np.ndarray]:
    """Published decoding: every frame of the video is decoded and kept; the sampled ones go to RGB."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if PYAV_THREADS:
            stream.thread_count = PYAV_THREADS
        all_frames = [frame for frame in container.decode(video=0)]
    idx = sample_eval_indices(len(all_frames), max_frames)
    return [all_frames[i].to_rgb().to_ndarray() for i in idx]


def _decord_decode_all_and_convert_sampled(path: str, max_frames: int) -> list[np.ndarray]:
    """Fallback without PyAV: decord decodes every frame in order (it also converts each one to RGB,
    which the published PyAV loader does only for the sampled frames: heavier than published)."""
    reader = open_video(path)
    all_frames = [reader.next() for _ in range(len(reader))]
    idx = sample_eval_indices(len(all_frames), max_frames)
    return [all_frames[i].asnumpy() for i in idx]


def _published_transform(frames: list[np.ndarray]) -> torch.Tensor:
    """Per sampled frame: HWC uint8 -> contiguous CHW float /255 (whole frame); stack; center crop;
    normalise in place (as the published GroupToTensorBCHW, CenterCrop, TensorNormalize)."""
    x = torch.stack([torch.from_numpy(f).permute(2, 0, 1).contiguous().float().div_(255) for f in frames])
    x = center_crop(x, SIZE)
    return x.sub_(_MEAN).div_(_STD)


def make_methods(have_pyav: bool):
    decode_all = _pyav_decode_all_and_convert_sampled if have_pyav else _decord_decode_all_and_convert_sampled
    label = "published (PyAV)" if have_pyav else "decord decode-all (fallback)"

    def ours(path, max_frames):
        return load_video(path, max_frames, SIZE, train=False)[0]

    def published(path, max_frames):
        return _published_transform(decode_all(path, max_frames))

    def ours_decode(path, max_frames):
        return read_frames(path, max_frames, train=False)[0]

    def published_decode(path, max_frames):
        return torch.from_numpy(np.stack(decode_all(path, max_frames)))

    return [("ours", ours), (label, published), ("ours, decode only", ours_decode),
            (f"{label}, decode only", published_decode)]


# ---------------------------------------------------------------------------------------------- timing
def run_rounds(methods, paths, max_frames, rounds):
    """``wall[m][r]`` and ``cpu[m][r]``: seconds method ``m`` took for all videos in round ``r``."""
    k = len(methods)
    wall = [[0.0] * rounds for _ in range(k)]
    cpu = [[0.0] * rounds for _ in range(k)]
    for p in paths:  # warm-up: file cache, lazy imports, allocator
        for _, fn in methods:
            fn(p, max_frames)
    for r in range(rounds):
        for v, p in enumerate(paths):
            for j in range(k):
                m = (j + v + r) % k
                w0, c0 = time.perf_counter(), time.process_time()
                methods[m][1](p, max_frames)
                wall[m][r] += time.perf_counter() - w0
                cpu[m][r] += time.process_time() - c0
    return wall, cpu


def check_agreement(methods, path, max_frames) -> str:
    ours, published = methods[0][1](path, max_frames), methods[1][1](path, max_frames)
    a, b = methods[2][1](path, max_frames).float(), methods[3][1](path, max_frames).float()
    if ours.shape != published.shape or a.shape != b.shape:
        raise SystemExit(f"shape mismatch: {tuple(ours.shape)} vs {tuple(published.shape)}")
    frame_err = (a - b).abs()
    if frame_err.mean() > 3.0:
        raise SystemExit(f"the two loaders disagree on the frames of {path}: mean |diff| {frame_err.mean():.2f}")
    return (f"outputs agree: uint8 frames mean |diff| {frame_err.mean():.3f} (max {frame_err.max():.0f}), "
            f"model input max |diff| {(ours - published).abs().max():.4f}")


def report(name, paths, methods, wall, cpu, max_frames):
    n = len(paths)
    reader = open_video(paths[0])
    keys = list(reader.get_key_indices())
    size_kb = sum(os.path.getsize(p) for p in paths) / n / 1024
    print(f"\n[{name}] {n} videos, {len(reader)} frames of {reader[0].shape[1]}x{reader[0].shape[0]} "
          f"at {reader.get_avg_fps():g} fps (first), keyframes {keys[:8]}{' ...' if len(keys) > 8 else ''}, "
          f"{size_kb:.1f} KB/video, {max_frames}-frame sampling")
    del reader
    print(f"  {'method':42s} {'clips/s':>9s} {'(cpu)':>9s}")
    for (label, _), w, c in zip(methods, wall, cpu):
        print(f"  {label:42s} {statistics.median(n / t for t in w):9.1f} {statistics.median(n / t for t in c):9.1f}")
    ratios = {}
    for label, a, b in (("full", 0, 1), ("decode only", 2, 3)):
        rw = statistics.median(wb / wa for wa, wb in zip(wall[a], wall[b]))
        spread = sorted(cb / ca for ca, cb in zip(cpu[a], cpu[b]))
        rc = statistics.median(spread)
        ratios[label] = (rc, rw)
        print(f"  ratio ours / {methods[b][0]}: {rc:.2f}x cpu (rounds {spread[0]:.2f}-{spread[-1]:.2f}), "
              f"{rw:.2f}x wall")
    return ratios


def main(argv=None) -> int:
    global PYAV_THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video_dir", default=None, help="folder of 3 fps, 224 px .mp4 videos (default: generate)")
    ap.add_argument("--num_videos", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--keyint", type=int, default=3,
                    help="keyframe interval of the short-GOP set (frames)")
    ap.add_argument("--max_frames", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pyav_threads", type=int, default=1, help="PyAV decoder threads (0: PyAV's default)")
    a = ap.parse_args(argv)
    PYAV_THREADS = a.pyav_threads
    torch.set_num_threads(1)
    try:
        import av  # noqa: F401  the published decoder
        have_pyav = True
    except ImportError:
        have_pyav = False
        print("PyAV is not installed (pip install av): the baseline falls back to decord decode-all, which also "
              "converts every frame to RGB (heavier than the published loader)", file=sys.stderr)
    methods = make_methods(have_pyav)
    with tempfile.TemporaryDirectory() as tmp:
        if a.video_dir:
            paths = sorted(os.path.join(a.video_dir, f) for f in os.listdir(a.video_dir) if f.endswith(".mp4"))
            if not paths:
                print("no videos found", file=sys.stderr)
                return 1
            sets = {a.video_dir: paths}
        else:
            t0 = time.perf_counter()
            sets = make_sets(tmp, a.num_videos, a.seconds, a.keyint)
            print(f"encoded {2 * a.num_videos} videos in {time.perf_counter() - t0:.1f} s")
        print(f"timing: {a.rounds} rounds, medians; both loaders single-threaded per clip "
              f"(PyAV threads: {a.pyav_threads or 'default'}), torch threads 1")
        summary = {}
        for name, paths in sets.items():
            print(f"[{name}] {check_agreement(methods, paths[0], a.max_frames)}")
            wall, cpu = run_rounds(methods, paths, a.max_frames, a.rounds)
            summary[name] = report(name, paths, methods, wall, cpu, a.max_frames)
        print()
        for name, r in summary.items():
            (fc, fw), (dc, dw) = r["full"], r["decode only"]
            print(f"ratio ours / {methods[1][0]} [{name}]: {fc:.2f}x cpu, {fw:.2f}x wall "
                  f"(decode only {dc:.2f}x cpu, {dw:.2f}x wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
