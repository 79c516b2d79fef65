"""Small helpers around the ffmpeg binary: find it, encode raw RGB frames to an mp4 atomically."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Optional

import numpy as np

from runtime.files import give_new_file_mode


def find_ffmpeg() -> str:
    """The ffmpeg binary: the one on PATH, else the one shipped with ``imageio-ffmpeg``."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise FileNotFoundError("no ffmpeg on PATH and imageio-ffmpeg is not installed "
                                "(pip install imageio-ffmpeg, or install ffmpeg)") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


def temporary_path_for(path: str) -> str:
    """A unique file name next to ``path`` with the same extension (so ffmpeg infers the format)."""
    directory, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".part{ext}", dir=directory)
    os.close(fd)
    return tmp


def keyint_args(keyint: Optional[int]) -> list[str]:
    """x264 options for a keyframe on every ``keyint``-th frame (none for None/0: x264's default of a
    keyframe every 250 frames plus scene cuts). Scene-cut detection is turned off so that keyframes
    fall exactly on multiples of ``keyint``."""
    if not keyint:
        return []
    if int(keyint) < 1:
        raise ValueError(f"keyint must be >= 1 (or 0/None for x264's default), got {keyint}")
    return ["-g", str(int(keyint)), "-keyint_min", str(int(keyint)), "-sc_threshold", "0"]


def write_video(path: str, frames: np.ndarray, fps: float = 3.0, crf: int = 18,
                keyint: Optional[int] = None, ffmpeg: Optional[str] = None) -> str:
    """Encode uint8 RGB frames ``(T, H, W, 3)`` (H, W even) to H.264 yuv420p ``path``, atomically.

    ``crf=0`` is lossless in YUV (useful for tests that check pixel values); ``keyint`` puts a keyframe
    on every ``keyint``-th frame exactly (scene-cut keyframes off; x264's default GOP when None or 0).
    """
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise ValueError(f"need at least one frame and even height/width, got {frames.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_path_for(path)
    x264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast", "-threads", "1"]
    x264 += ["-qp", "0"] if crf == 0 else ["-crf", str(crf)]
    x264 += keyint_args(keyint)
    cmd = [ffmpeg or find_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0", *x264, "-an", "-f", "mp4", tmp]
    try:
        proc = subprocess.run(cmd, input=frames.tobytes(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')[-500:]}")
        give_new_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
