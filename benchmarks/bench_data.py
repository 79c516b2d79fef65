"""Video loading: sparse sampling against the published loader, DataLoader throughput, decord against PyAV.

    python benchmarks/bench_data.py [--video_dir DIR] [--num_videos 24] [--seconds 10] [--keyint 3]
                                    [--rounds 7] [--pyav_threads 1]
    python benchmarks/bench_data.py --mode loader [--workers 0 1 2 4] [--frames 12 64] [--device cuda]
                                    [--frame_cache 1]
    python benchmarks/bench_data.py --mode decoders

``--mode sampling`` (default) is described below. ``--mode loader`` measures what a training run gets
from its DataLoader: videos/s with N workers, for 12 frames of 10 s clips and 64 frames of two-minute
ActivityNet-like videos, for both decoders (``--video_decoder decord|pyav``), next to the videos/s of
the model's evaluation forward (ViT-B/32 shape, random weights, on ``--device``) measured in the same
run, so a reader sees whether the loader keeps the model fed; with ``--frame_cache 1`` (default) it also
builds raw and JPEG frame caches of the 12-frame clips (``python -m preprocess.frame_cache``), reports
their size per 1,000 clips and build speed, times the loader reading them, and prints how many cores of
loading a GPU needs at the training and evaluation rates measured on an H100 (README.md). ``--mode decoders`` encodes B-frame-heavy
(open and closed GOP) and variable-frame-rate files with ffmpeg and compares decord's frames with
PyAV's: frame counts, frame rates, a sequential decode, and the sparse reads the loader makes.

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

from dataloaders.video import (CLIP_MEAN, CLIP_STD, DECODERS, center_crop, load_video,  # noqa: E402
                               open_video, read_frames, sample_eval_indices)
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


# ---------------------------------------------------------------------------------------------- loader mode
class ClipSet(torch.utils.data.Dataset):
    """Training-sampled model inputs of a list of files, as a DataLoader worker produces them."""

    def __init__(self, paths, max_frames, decoder, frame_cache=None):
        self.paths, self.max_frames, self.decoder, self.frame_cache = paths, max_frames, decoder, frame_cache

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_video(self.paths[i], self.max_frames, SIZE, train=True, decoder=self.decoder,
                          frame_cache=self.frame_cache)[:2]


def loader_videos_per_s(paths, max_frames, decoder, workers, batch, epochs, frame_cache=None) -> float:
    """Videos/s over ``epochs`` passes after a warm-up pass (worker start-up excluded)."""
    loader = torch.utils.data.DataLoader(ClipSet(paths, max_frames, decoder, frame_cache), batch_size=batch,
                                         num_workers=workers, persistent_workers=workers > 0, shuffle=True)
    for _ in loader:  # warm-up: workers start, files enter the page cache
        pass
    t0 = time.perf_counter()
    for _ in range(epochs):
        for _ in loader:
            pass
    return epochs * len(paths) / (time.perf_counter() - t0)


def clips_per_cpu_second(paths, max_frames, decoder, frame_cache=None, rounds=3) -> float:
    """Training-sampled clips per second of CPU time of this process (one compute thread; decord's
    decoder thread counted): what one fully busy core yields, whatever else shares the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for r in range(rounds + 1):
            t0 = time.process_time()
            for p in paths:
                load_video(p, max_frames, SIZE, train=True, decoder=decoder, frame_cache=frame_cache)
            if r:  # the first pass warms the page cache
                best = min(best, time.process_time() - t0)
        return len(paths) / best
    finally:
        torch.set_num_threads(threads)


# The model's clips/s on a GPU, from the measurements in README.md (H100, ViT-B/32, 12 frames, batch 128):
# the training step (AMP) takes 0.251 s; evaluation encodes 335 videos/s in fp32 and 1403 in bf16.
GPU_REFERENCE = {"H100 B/32 AMP training step, batch 128": 128 / 0.251,
                 "H100 B/32 evaluation, fp32": 335.0, "H100 B/32 evaluation, bf16": 1403.0}


def build_caches(tmp, paths, max_frames):
    """Raw and JPEG frame caches of ``paths`` (every frame, as training needs): {name: (FrameCache, build
    s, bytes)}; built in this process on one core (one decoder thread)."""
    from dataloaders.frame_cache import FrameCache
    from preprocess.frame_cache import build_frame_cache

    caches = {}
    for name, encoding in (("cache-raw", "raw"), ("cache-jpeg", "jpeg")):
        out = os.path.join(tmp, name)
        t0 = time.process_time()
        build_frame_cache(out, paths, frames="all", max_frames=max_frames, size=SIZE, encoding=encoding,
                          quality=90, log=None)
        cpu_s = time.process_time() - t0
        size = sum(os.path.getsize(os.path.join(out, "shards", f)) for f in os.listdir(os.path.join(out, "shards")))
        caches[name] = (FrameCache(out), cpu_s, size)
    return caches


def model_videos_per_s(max_frames, device, batch, layers, reps=3) -> float:
    """Evaluation forward (video encoder) of the ViT-B/32-shaped model with random weights."""
    from modules.clip import CLIP, CLIPConfig
    from modules.dgl import DGL, DGLConfig

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision_layers=layers, transformer_layers=layers))
    model = DGL(clip, DGLConfig(shared_latent_space="linear", max_frames=max_frames,
                                unified_transformer_layers=layers)).to(device).eval()
    video = torch.randn(batch, max_frames, 3, SIZE, SIZE, device=device)
    mask = torch.ones(batch, max_frames, dtype=torch.long, device=device)
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.encode_video(video, mask)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[1:])


def run_loader(a) -> int:
    have_pyav = _have_pyav()
    decoders = [d for d in DECODERS if d != "pyav" or have_pyav]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sets = {12: ("short", a.seconds, None), 64: ("long", a.long_seconds, a.long_keyint)}
        files = {}
        ffmpeg = find_ffmpeg()
        for frames in a.frames:
            name, seconds, keyint = sets.get(frames, ("long" if frames > 12 else "short", a.seconds, None))
            files[frames] = [write_video(os.path.join(tmp, f"{name}{i}.mp4"), render(i, seconds), fps=3.0, crf=23,
                                         keyint=keyint, ffmpeg=ffmpeg) for i in range(a.num_videos)]
            print(f"{frames} frames: {a.num_videos} videos of {seconds:g} s at 3 fps, 398x224"
                  f"{f', keyframe every {keyint} frames' if keyint else ', x264 default GOP'}")
        print(f"encoded in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs; DataLoader batch {a.batch}, "
              f"{a.epochs} timed passes after a warm-up pass")
        caches = {}
        if a.frame_cache:
            frames = min(a.frames)
            caches = build_caches(tmp, files[frames], frames)
            print(f"\nframe cache of the {a.num_videos} {frames}-frame clips (every frame, {SIZE} px; size per "
                  f"1,000 clips extrapolated from these {a.num_videos}):")
            for name, (_, cpu_s, size) in caches.items():
                print(f"  {name:>10s}: {size / a.num_videos / 2**20:6.2f} MiB/clip = "
                      f"{size / a.num_videos * 1000 / 2**30:6.2f} GiB per 1,000 clips; built at "
                      f"{a.num_videos / cpu_s:5.1f} clips/s per core (CPU time)")
        frames = min(a.frames)
        sources = [(d, d, None) for d in decoders] + [(name, "decord", c) for name, (c, _, _) in caches.items()]
        per_core = {label: clips_per_cpu_second(files[frames], frames, decoder, cache, a.rounds_cpu)
                    for label, decoder, cache in sources}
        print(f"\nclips/s per core at {frames} frames (training sampling, one process, one thread, in CPU time, "
              f"best of {a.rounds_cpu} passes): " + ", ".join(f"{k} {v:.1f}" for k, v in per_core.items()))
        model = {}
        if a.model_layers:
            for f in a.frames:
                model[f] = model_videos_per_s(f, a.device, a.model_batch, a.model_layers)
        print(f"\n  {'frames':>6s} {'source':>10s} {'workers':>7s} {'clips/s':>8s} "
              f"{'model clips/s':>13s} {'loader/model':>12s}")
        for f in a.frames:
            for label, decoder, cache in (sources if f == frames else sources[:len(decoders)]):
                for workers in a.workers:
                    v = loader_videos_per_s(files[f], f, decoder, workers, a.batch, a.epochs, cache)
                    m = model.get(f)
                    print(f"  {f:6d} {label:>10s} {workers:7d} {v:8.1f} "
                          f"{(f'{m:.1f}' if m else '-'):>13s} {(f'{v / m:.2f}x' if m else '-'):>12s}", flush=True)
    if a.model_layers:
        print(f"\nmodel here: DGL evaluation forward, ViT-B/32 shape with {a.model_layers} layers, 224 px, batch "
              f"{a.model_batch}, fp32, on {a.device}; loader/model >= 1 means the loader keeps up")
    print(f"\ncores of loading one GPU needs at {frames} frames (GPU clips/s from README.md's H100 figures / "
          f"clips/s per core above):")
    print(f"  {'GPU workload':>40s} {'clips/s':>8s} " + " ".join(f"{label:>10s}" for label in per_core))
    for name, rate in GPU_REFERENCE.items():
        print(f"  {name:>40s} {rate:8.0f} " + " ".join(f"{rate / v:10.1f}" for v in per_core.values()))
    return 0


# ---------------------------------------------------------------------------------------------- decoders mode
def numbered_frames(n: int, height: int = 120, width: int = 160) -> np.ndarray:
    """Frames that identify themselves: frame k has a distinct moving gradient and blue level."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((n, height, width, 3), np.uint8)
    for k in range(n):
        out[k, ..., 0] = (2 * xx + 3 * k) % 256
        out[k, ..., 1] = (2 * yy + 5 * k) % 256
        out[k, ..., 2] = (37 * k) % 256
    return out


VFR_PTS = "setpts='if(lt(N,40),N/30,if(lt(N,80),40/30+(N-40)/5,40/30+8+(N-80)/15))/TB'"
X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-threads", "1", "-crf", "18"]
DECODER_CASES = {  # name: (frames, input fps, ffmpeg output options, container)
    "x264 default (reference)": (300, 30, X264, "mp4"),
    "B-frames 16, closed GOP": (300, 30, X264 + ["-bf", "16", "-b_strategy", "0", "-refs", "4", "-g", "60"], "mp4"),
    "B-pyramid, open GOP": (300, 30, X264 + ["-bf", "8", "-x264-params", "b-pyramid=normal:open-gop=1:keyint=48"],
                            "mp4"),
    "variable frame rate (mp4)": (120, 30, X264 + ["-vf", VFR_PTS, "-fps_mode", "vfr"], "mp4"),
    "variable frame rate (mkv)": (120, 30, X264 + ["-vf", VFR_PTS, "-fps_mode", "vfr"], "mkv"),
}


def encode_case(path, n, fps, options):
    frames = numbered_frames(n)
    cmd = [find_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{frames.shape[2]}x{frames.shape[1]}", "-r", str(fps), "-i", "pipe:0", *options, "-an", path]
    import subprocess

    subprocess.run(cmd, input=frames.tobytes(), check=True, capture_output=True)
    return path


def pyav_all_frames(path):
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        listed, rate = int(stream.frames or 0), float(stream.average_rate or 0)
        frames = np.stack([f.to_rgb().to_ndarray() for f in container.decode(stream)])
    return frames, listed, rate


def differing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame max |difference| of two (N, H, W, 3) uint8 stacks."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).reshape(len(a), -1).max(1)


def which_frames(got: np.ndarray, reference: np.ndarray) -> list[int]:
    """For each frame of ``got``, the index of the closest reference frame (mean squared error)."""
    ref = reference.reshape(len(reference), -1).astype(np.float32)
    return [int(((ref - g.reshape(1, -1).astype(np.float32)) ** 2).mean(1).argmin()) for g in got]


def compare_decoders(path, rng, trials):
    """decord against PyAV on one file; returns printable findings."""
    import decord

    ref, listed, rate = pyav_all_frames(path)
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n = min(len(reader), len(ref))
    lines = [f"frames: decord {len(reader)}, PyAV decoded {len(ref)} (container lists {listed or 'unknown'}); "
             f"fps: decord {reader.get_avg_fps():.4g}, PyAV average_rate {rate:.4g}"]
    seq = differing(reader.get_batch(list(range(n))).asnumpy(), ref[:n])
    lines.append(f"sequential decode of all frames: {int((seq > 0).sum())} of {n} frames differ")
    del reader
    bad = total = 0
    wrong = []
    for _ in range(trials):  # fresh reader per read, as a DataLoader worker does
        idx = sorted(rng.choice(n, size=min(12, n), replace=False).tolist())
        got = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1).get_batch(idx).asnumpy()
        d = differing(got, ref[idx])
        bad, total = bad + int((d > 0).sum()), total + len(idx)
        wrong += [(i, j) for i, j, e in zip(idx, which_frames(got, ref), d) if e > 0]
    lines.append(f"random sparse reads (12 frames, {trials} files opened): {bad} of {total} frames differ"
                 + (f"; e.g. asked {wrong[0][0]}, got {wrong[0][1]}" if wrong else ""))
    for frames in (12, 64):
        a, _ = read_frames(path, frames, train=False, decoder="decord")
        b, _ = read_frames(path, frames, train=False, decoder="pyav")
        if a.shape != b.shape:
            lines.append(f"loader, {frames} eval frames: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        d = differing(a.numpy(), b.numpy())
        got = which_frames(a.numpy(), ref)
        want = which_frames(b.numpy(), ref)
        moved = [(w, g) for w, g, e in zip(want, got, d) if e > 0]
        lines.append(f"loader, {frames} eval-sampled frames: {int((d > 0).sum())} differ"
                     + (f" (PyAV frame {moved[0][0]} -> decord frame {moved[0][1]})" if moved else ""))
    a, _ = read_frames(path, 8, train=False, start=1, end=5, decoder="decord")
    b, _ = read_frames(path, 8, train=False, start=1, end=5, decoder="pyav")
    d = differing(a.numpy(), b.numpy())
    lines.append(f"loader, clip 1-5 s, 8 frames: {int((d > 0).sum())} differ"
                 + (f" (PyAV frames {which_frames(b.numpy(), ref)}, decord {which_frames(a.numpy(), ref)})"
                    if (d > 0).any() else ""))
    return lines


def run_decoders(a) -> int:
    if not _have_pyav():
        print("PyAV is not installed (pip install av): nothing to compare", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (n, fps, options, ext)) in enumerate(DECODER_CASES.items()):
            path = encode_case(os.path.join(tmp, f"case{i}.{ext}"), n, fps, options)
            print(f"\n[{name}] {n} frames of 160x120 encoded at {fps} fps")
            for line in compare_decoders(path, rng, a.trials):
                print("  " + line, flush=True)
    return 0


def _have_pyav() -> bool:
    try:
        import av  # noqa: F401  the published decoder
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------- command line
def run_sampling(a) -> int:
    global PYAV_THREADS
    PYAV_THREADS = a.pyav_threads
    have_pyav = _have_pyav()
    if not have_pyav:
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


def main(argv=None) -> int:
    from runtime.errors import finite_float

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["sampling", "loader", "decoders"], default="sampling")
    ap.add_argument("--video_dir", default=None, help="sampling: folder of 3 fps, 224 px .mp4 videos "
                                                      "(default: generate)")
    ap.add_argument("--num_videos", type=int, default=24)
    ap.add_argument("--seconds", type=finite_float, default=10.0, help="length of the generated clips (12 frames)")
    ap.add_argument("--keyint", type=int, default=3,
                    help="sampling: keyframe interval of the short-GOP set (frames)")
    ap.add_argument("--max_frames", type=int, default=12, help="sampling: frames per clip")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pyav_threads", type=int, default=1, help="sampling: PyAV decoder threads (0: PyAV's default)")
    ap.add_argument("--frames", type=int, nargs="+", default=[12, 64], help="loader: frames per video")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader: DataLoader workers")
    ap.add_argument("--batch", type=int, default=4, help="loader: DataLoader batch size")
    ap.add_argument("--epochs", type=int, default=2, help="loader: timed passes over the videos")
    ap.add_argument("--long_seconds", type=finite_float, default=120.0, help="loader: length of the 64-frame videos")
    ap.add_argument("--long_keyint", type=int, default=3,
                    help="loader: keyframe interval of the 64-frame videos (0: x264 default)")
    ap.add_argument("--model_layers", type=int, default=12, help="loader: model depth (0: do not time the model)")
    ap.add_argument("--model_batch", type=int, default=2, help="loader: model batch")
    ap.add_argument("--device", default="cpu", help="loader: device of the model forward")
    ap.add_argument("--trials", type=int, default=10, help="decoders: random sparse reads per file")
    ap.add_argument("--rounds_cpu", type=int, default=3, help="loader: timed passes of the per-core measurement")
    ap.add_argument("--frame_cache", type=int, default=1, choices=[0, 1],
                    help="loader: also build raw and JPEG frame caches of the shortest clips and time them")
    a = ap.parse_args(argv)
    if a.mode == "sampling":
        torch.set_num_threads(1)
    return {"sampling": run_sampling, "loader": run_loader, "decoders": run_decoders}[a.mode](a)


if __name__ == "__main__":
    raise SystemExit(main())
