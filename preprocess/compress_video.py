"""Re-encode a folder tree of raw videos to 3 fps with the short side scaled to 224 (even sizes).

    python -m preprocess.compress_video --input_root RAW --output_root OUT [--fps 3] [--size 224] [--workers N]
                                        [--keyint K] [--published_scaling]

Scaling: by default the short side becomes ``size`` and the long side keeps the aspect ratio (rounded to
even). ``--published_scaling`` instead runs the published preprocessing command: ffmpeg's scale filter
``scale='if(gt(a,1),trunc(oh*a/2)*2,224)':'if(gt(a,1),224,trunc(ow*a/2)*2)'`` (a = width / height),
the output frame rate as an output option (``-r 3``, which picks frames differently from the ``fps``
filter) and x264's default settings. Landscape videos come out identical in size (height 224);
portrait ones get width 224 and height ``trunc(224 * a / 2) * 2`` < 224: squashed, and zero-padded by
the loader's centre crop. Those are the inputs the official checkpoints were trained and evaluated on,
so use it to reproduce the published numbers exactly; use the default for anything else.

Each ``RAW/a/b/name.ext`` becomes ``OUT/a/b/name.mp4`` (H.264, no audio). Outputs that exist and are
valid (decodable, with frames, short side == size) are skipped. Each file is written under a temporary
name and renamed when complete, so an interrupted run leaves no half-written output. Failures are
listed at the end with their reason; the exit status is 1 when any file failed.

Keyframe interval (``--keyint K``): a keyframe on every K-th output frame exactly (x264 ``-g K
-keyint_min K -sc_threshold 0``); the default (0) keeps x264's GOP of 250 frames, i.e. a single
keyframe in anything shorter than 83 s at 3 fps. The loader (``dataloaders/video.py``) asks decord for
the sampled frames only, but decord must decode forward from the last keyframe before each of them,
so with one keyframe a sparse read still decodes every frame up to the last sampled one. A short
interval lets it seek over the rest. Measured with ``benchmarks/bench_data.py`` (12 sampled frames,
398x224 synthetic clips, process CPU time, medians; ours / the published decode-everything loader):

* 10 s clips (30 frames): x264 default GOP 1.28x, ``--keyint 3`` 0.87x (decoding alone 1.02x and
  0.74x), with files ~4x larger. With 12 of 30 frames sampled there is little to skip, keyframes cost
  several times a P-frame to decode, and each decord seek restarts its decoder thread;
* 30 s clips: 1.05x against 1.34x;
* 60 s clips: 1.15x against 1.82x.

So the default stays x264's GOP (MSR-VTT, MSVD, LSMDC and DiDeMo clips are 2-30 s); ``--keyint 3``
(one keyframe per second) pays off for minute-long videos such as ActivityNet's, at the cost of
larger files (more intra frames). Existing outputs whose keyframes are further
apart than the requested ``--keyint`` are not "valid" and get re-encoded.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional

from .ffmpeg_tools import find_ffmpeg, keyint_args, temporary_path_for

DEFAULT_KEYINT = 0  # 0/None: x264's default GOP; see "Keyframe interval" in the module docstring
RAW_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".3gp", ".mpg", ".mpeg", ".flv", ".wmv")


@dataclass(frozen=True)
class Job:
    src: str
    dst: str


@dataclass(frozen=True)
class Result:
    src: str
    dst: str
    status: str  # "done", "skipped" or "failed"
    reason: str = ""


def list_jobs(input_root: str, output_root: str, extensions: Iterable[str] = RAW_EXTENSIONS) -> list[Job]:
    exts = tuple(e.lower() for e in extensions)
    jobs = []
    for dirpath, dirs, files in os.walk(input_root):
        dirs.sort()
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(exts):
                continue
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, input_root)
            jobs.append(Job(src, os.path.join(output_root, os.path.splitext(rel)[0] + ".mp4")))
    return jobs


def max_keyframe_gap(key_indices, num_frames: int) -> int:
    """The longest run of frames from one keyframe to the next (or to the end)."""
    keys = sorted(int(k) for k in key_indices)
    if not keys or keys[0] != 0:
        return num_frames
    return max(b - a for a, b in zip(keys, keys[1:] + [num_frames]))


def is_valid_output(path: str, size: int, keyint: Optional[int] = None, published_scaling: bool = False) -> bool:
    """True when ``path`` decodes, has frames, its short side is ``size`` (with ``published_scaling``: its
    width or height is ``size``) and, when ``keyint`` is given, no two keyframes are more than ``keyint``
    frames apart."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    try:
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        if len(reader) == 0:
            return False
        if keyint and max_keyframe_gap(reader.get_key_indices(), len(reader)) > keyint:
            return False
        h, w = reader[0].shape[:2]
        return size in (h, w) if published_scaling else min(h, w) == size
    except Exception:
        return False


def scale_filter_args(size: int) -> tuple[str, str]:
    """ffmpeg scale w/h expressions: short side -> ``size``, long side keeps the aspect, rounded to even."""
    return f"if(lt(iw,ih),{size},-2)", f"if(lt(iw,ih),-2,{size})"


def published_scale_filter_args(size: int) -> tuple[str, str]:
    """The published script's scale w/h expressions (``a`` = input width / height): landscape -> height
    ``size``; portrait and square -> width ``size`` and height ``trunc(size * a / 2) * 2`` (not
    ``size / a``: portrait videos are squashed, as published)."""
    return f"if(gt(a,1),trunc(oh*a/2)*2,{size})", f"if(gt(a,1),{size},trunc(ow*a/2)*2)"


def published_output_size(width: int, height: int, size: int = 224) -> tuple[int, int]:
    """``(width, height)`` that the published scale filter gives a ``width x height`` input."""
    a = width / height
    if a > 1:
        return int(size * a / 2) * 2, size
    return size, int(size * a / 2) * 2


def _ffmpeg_stream(src: str, dst: str, fps: float, size: int, keyint: Optional[int], published_scaling: bool):
    """The ffmpeg-python graph of one re-encode: ours (fps filter, short side, x264 fast/crf 23/yuv420p)
    or the published command (scale filter, ``-r fps``, x264 defaults)."""
    import ffmpeg as ffmpeg_python

    gop = keyint_args(keyint)  # ["-g", k, "-keyint_min", k, "-sc_threshold", "0"] or []
    gop_kwargs = {gop[i].lstrip("-"): gop[i + 1] for i in range(0, len(gop), 2)}
    video = ffmpeg_python.input(src).video
    if published_scaling:
        w, h = published_scale_filter_args(size)
        return video.filter("scale", w, h).output(dst, format="mp4", vcodec="libx264", r=fps, an=None,
                                                   movflags="+faststart", **gop_kwargs)
    w, h = scale_filter_args(size)
    return (video.filter("fps", fps=fps).filter("scale", w, h)
            .output(dst, format="mp4", vcodec="libx264", pix_fmt="yuv420p", preset="fast", crf=23, an=None,
                    movflags="+faststart", **gop_kwargs))


def compress_one(job: Job, fps: float = 3.0, size: int = 224, ffmpeg: Optional[str] = None,
                 overwrite: bool = False, keyint: Optional[int] = DEFAULT_KEYINT,
                 published_scaling: bool = False) -> Result:
    import ffmpeg as ffmpeg_python

    if not overwrite and is_valid_output(job.dst, size, keyint, published_scaling):
        return Result(job.src, job.dst, "skipped")
    if not os.path.isfile(job.src) or os.path.getsize(job.src) == 0:
        return Result(job.src, job.dst, "failed", "input missing or empty")
    os.makedirs(os.path.dirname(os.path.abspath(job.dst)), exist_ok=True)
    tmp = temporary_path_for(job.dst)
    try:
        stream = _ffmpeg_stream(job.src, tmp, fps, size, keyint, published_scaling)
        try:
            stream.run(cmd=ffmpeg or find_ffmpeg(), capture_stdout=True, capture_stderr=True,
                       overwrite_output=True, quiet=True)
        except ffmpeg_python.Error as exc:
            lines = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            return Result(job.src, job.dst, "failed", " | ".join(lines[-3:]) or "ffmpeg failed")
        if not is_valid_output(tmp, size, keyint, published_scaling):
            return Result(job.src, job.dst, "failed", "ffmpeg produced no decodable frames")
        os.replace(tmp, job.dst)
        return Result(job.src, job.dst, "done")
    except Exception as exc:  # keep the pool alive; report the reason
        return Result(job.src, job.dst, "failed", f"{type(exc).__name__}: {exc}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _run_job(payload) -> Result:
    job, fps, size, ffmpeg, overwrite, keyint, published_scaling = payload
    return compress_one(job, fps, size, ffmpeg, overwrite, keyint, published_scaling)


def compress_tree(input_root: str, output_root: str, fps: float = 3.0, size: int = 224,
                  workers: Optional[int] = None, overwrite: bool = False, progress: bool = True,
                  keyint: Optional[int] = DEFAULT_KEYINT, published_scaling: bool = False) -> list[Result]:
    """Compress every video under ``input_root``; returns one :class:`Result` per input file."""
    from tqdm import tqdm

    if not os.path.isdir(input_root):
        raise FileNotFoundError(f"input folder not found: {input_root}")
    if os.path.abspath(input_root) == os.path.abspath(output_root):
        raise ValueError("output_root must differ from input_root")
    jobs = list_jobs(input_root, output_root)
    ffmpeg = find_ffmpeg()
    payloads = [(j, fps, size, ffmpeg, overwrite, keyint, published_scaling) for j in jobs]
    workers = max(1, workers or (os.cpu_count() or 1))
    results: list[Result] = []
    bar = tqdm(total=len(jobs), desc="compress", unit="video", disable=not progress)
    if workers == 1:
        for p in payloads:
            results.append(_run_job(p))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(_run_job, payloads, chunksize=1):
                results.append(r)
                bar.update()
    bar.close()
    return results


def summarize(results: list[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines = [f"{len(results)} videos: {counts['done']} compressed, {counts['skipped']} already valid, "
             f"{counts['failed']} failed"]
    lines += [f"FAILED {r.src}: {r.reason}" for r in results if r.status == "failed"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from runtime.errors import finite_float

    p = argparse.ArgumentParser(description="Re-encode videos to 3 fps with the short side scaled to 224.")
    p.add_argument("--input_root", required=True)
    p.add_argument("--output_root", required=True)
    p.add_argument("--fps", type=finite_float, default=3.0)
    p.add_argument("--size", type=int, default=224, help="short side in pixels (even)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="re-encode even when a valid output exists")
    p.add_argument("--keyint", type=int, default=DEFAULT_KEYINT,
                   help="a keyframe every KEYINT output frames, e.g. 3 = one per second at 3 fps (default 0: "
                        "x264's default GOP, a keyframe every 250 frames); worth it for videos of a minute or "
                        "more, not for 10-30 s clips (see the module docstring)")
    p.add_argument("--published_scaling", action="store_true",
                   help="run the published ffmpeg command (its scale filter, -r FPS, x264 defaults) to rebuild "
                        "the exact inputs of the official checkpoints: portrait videos get width SIZE and a "
                        "squashed height below SIZE (see the module docstring); default: short side = SIZE")
    a = p.parse_args(argv)
    if a.size % 2:
        p.error("--size must be even")
    if a.keyint < 0:
        p.error("--keyint must be >= 0")
    results = compress_tree(a.input_root, a.output_root, a.fps, a.size, a.workers, a.overwrite,
                            keyint=a.keyint or None, published_scaling=a.published_scaling)
    print(summarize(results), file=sys.stderr)
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
