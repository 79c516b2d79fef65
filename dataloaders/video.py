"""Frame sampling, sparse decoding with decord, and CLIP pixel transforms (torch only).

Sampling follows section 5 of the DGL spec and the published ``sampling.py``:

* training: the ``N`` frames are cut into ``T`` segments of ``N // T`` frames and one frame is drawn
  at a random offset inside each segment (frames past ``T * (N // T)`` are never drawn, as published);
* evaluation: the centre of each of ``T`` segments of ``N / T`` frames, ``int(tick / 2 + tick * t)``;
* a video with ``N <= T`` frames takes every frame once and repeats its last frame; the mask marks the
  ``min(N, T)`` real frames.

Only the sampled frames are converted and copied out of the decoder (one ``VideoReader.get_batch`` of
the sorted distinct indices); the whole video is never materialised. How many frames the decoder
still has to decode depends on the keyframe interval of the file: decord decodes forward from the
last keyframe at or before each requested frame (see ``preprocess/compress_video.py``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# frame order flags of the published code: 0 normal, 1 reverse, 2 random
FRAME_ORDER_NORMAL, FRAME_ORDER_REVERSE, FRAME_ORDER_RANDOM = 0, 1, 2
FRAME_ORDERS = (FRAME_ORDER_NORMAL, FRAME_ORDER_REVERSE, FRAME_ORDER_RANDOM)


class VideoDecodeError(RuntimeError):
    """A video could not be read: missing, empty, truncated, undecodable or without frames."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path}: {reason}")


def _pad(indices: list[int], max_frames: int) -> list[int]:
    return indices + [indices[-1]] * (max_frames - len(indices))


def _short_video_indices(num_frames: int, max_frames: int) -> list[int] | None:
    """Every frame, the last repeated to fill, when the video has at most ``max_frames``; else None."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    return _pad(list(range(num_frames)), max_frames) if num_frames <= max_frames else None


def sample_train_indices(num_frames: int, max_frames: int,
                         generator: Optional[torch.Generator] = None) -> list[int]:
    """``max_frames`` indices: one random frame inside each of ``max_frames`` equal segments."""
    short = _short_video_indices(num_frames, max_frames)
    if short is not None:
        return short
    seg = num_frames // max_frames
    offsets = torch.randint(seg, (max_frames,), generator=generator).tolist()
    return [t * seg + o for t, o in enumerate(offsets)]


def sample_eval_indices(num_frames: int, max_frames: int) -> list[int]:
    """``max_frames`` indices: the centre of each of ``max_frames`` equal segments."""
    short = _short_video_indices(num_frames, max_frames)
    if short is not None:
        return short
    tick = num_frames / float(max_frames)
    return [int(tick / 2.0 + tick * t) for t in range(max_frames)]


def apply_frame_order(indices: Sequence[int], num_valid: int, frame_order: int,
                      generator: Optional[torch.Generator] = None) -> list[int]:
    """Reorder the ``num_valid`` real frames (0 normal, 1 reverse, 2 random); padding repeats the
    last frame of the reordered sequence so that the mask stays a prefix."""
    if frame_order not in FRAME_ORDERS:
        raise ValueError(f"frame_order must be one of {FRAME_ORDERS} (0 normal, 1 reverse, 2 random), "
                         f"got {frame_order!r}")
    indices = list(indices)
    real = indices[:num_valid]
    if frame_order == FRAME_ORDER_REVERSE:
        real = real[::-1]
    elif frame_order == FRAME_ORDER_RANDOM:
        real = [real[i] for i in torch.randperm(len(real), generator=generator).tolist()]
    return _pad(real, len(indices))


def time_to_frame_range(num_frames: int, fps: float, start: Optional[float],
                        end: Optional[float]) -> tuple[int, int]:
    """Inclusive frame range ``[first, last]`` of the clip ``[start, end]`` seconds (whole video when
    either is None), as the published decoder: ``int(start * fps)`` .. ``min(int(end * fps), N - 1)``."""
    if start is None or end is None:
        return 0, num_frames - 1
    start, end = max(0.0, float(start)), max(0.0, float(end))
    if start > end:
        start, end = end, start
    first = min(int(start * fps), num_frames - 1)
    last = max(first, min(int(end * fps), num_frames - 1))
    return first, last


def open_video(path: str, num_threads: int = 1):
    """A decord ``VideoReader`` with clear errors for missing, empty and undecodable files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    import decord  # imported lazily: keeps `import dataloaders` cheap

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as exc:  # decord raises its own DECORDError / RuntimeError
        text = str(exc).strip()
        if "cannot find video stream" in text:
            raise VideoDecodeError(path, "no video stream (zero frames)") from exc
        detail = text.splitlines()[0] if text else ""
        raise VideoDecodeError(path, f"undecodable or truncated ({type(exc).__name__}: {detail})") from exc
    if len(reader) == 0:
        raise VideoDecodeError(path, "the video has zero frames")
    return reader


def _sampled_indices(num_frames: int, fps: float, max_frames: int, train: bool, start: Optional[float],
                     end: Optional[float], frame_order: int,
                     generator: Optional[torch.Generator]) -> tuple[list[int], int]:
    """Absolute frame indices in output order (padding included) and the number of real frames."""
    first, last = time_to_frame_range(num_frames, fps, start, end)
    n = last - first + 1
    sampler = sample_train_indices(n, max_frames, generator) if train else sample_eval_indices(n, max_frames)
    num_valid = min(n, max_frames)
    order = apply_frame_order(sampler, num_valid, frame_order, generator)
    return [first + i for i in order], num_valid


def _batch_to_tensor(batch) -> torch.Tensor:
    """A decord NDArray as a uint8 tensor without another copy (DLPack), else through numpy."""
    try:
        from torch.utils.dlpack import from_dlpack

        return from_dlpack(batch.to_dlpack())
    except Exception:  # pragma: no cover - depends on the decord/torch builds
        return torch.from_numpy(batch.asnumpy())


def read_unique_frames(path: str, max_frames: int, train: bool, start: Optional[float] = None,
                       end: Optional[float] = None, frame_order: int = FRAME_ORDER_NORMAL,
                       generator: Optional[torch.Generator] = None,
                       num_threads: int = 1) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Decode each sampled frame once, in file order.

    Returns ``decoded`` uint8 ``(U, H, W, 3)`` (the ``U`` distinct sampled frames, ascending),
    ``take`` (``max_frames`` positions into ``decoded`` giving the output order, padding included) and
    ``mask`` int64 ``(max_frames,)``. One ``get_batch`` call reads the sorted distinct indices: decord
    decodes forward from the nearest keyframe and colour-converts only the requested frames.
    """
    reader = open_video(path, num_threads=num_threads)
    try:
        num_frames = len(reader)
        fps = float(reader.get_avg_fps() or 0.0)
        if (start is not None and end is not None) and fps <= 0:
            raise VideoDecodeError(path, "unknown frame rate, cannot cut a clip by time")
        order, num_valid = _sampled_indices(num_frames, fps, max_frames, train, start, end, frame_order,
                                            generator)
        wanted = sorted(set(order))
        try:
            batch = reader.get_batch(wanted)
        except Exception as exc:
            raise VideoDecodeError(path, f"decoding frames {wanted[0]}..{wanted[-1]} of {num_frames} failed "
                                         f"(truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
    finally:
        del reader
    decoded = _batch_to_tensor(batch)
    if decoded.ndim != 4 or decoded.shape[0] != len(wanted) or decoded.shape[-1] != 3:
        raise VideoDecodeError(path, f"decoder returned an array of shape {tuple(decoded.shape)}")
    pos = {idx: k for k, idx in enumerate(wanted)}
    mask = torch.zeros(max_frames, dtype=torch.long)
    mask[:num_valid] = 1
    return decoded, [pos[i] for i in order], mask


def _gather(x: torch.Tensor, take: list[int]) -> torch.Tensor:
    return x if take == list(range(x.shape[0])) else x[take]


def read_frames(path: str, max_frames: int, train: bool, start: Optional[float] = None,
                end: Optional[float] = None, frame_order: int = FRAME_ORDER_NORMAL,
                generator: Optional[torch.Generator] = None,
                num_threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode only the sampled frames of ``path``.

    Returns ``frames`` uint8 ``(max_frames, H, W, 3)`` RGB and ``mask`` int64 ``(max_frames,)``.
    Raises :class:`VideoDecodeError` naming the file on any failure.
    """
    decoded, take, mask = read_unique_frames(path, max_frames, train, start, end, frame_order, generator,
                                             num_threads)
    return _gather(decoded, take), mask


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float ``(T, C, H, W)`` so that the short side is ``size`` (bicubic, antialiased)."""
    h, w = frames.shape[-2:]
    if min(h, w) == size:
        return frames
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
        new_h, new_w = max(size, int(round(h * size / w))), size
    out = F.interpolate(frames, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0.0, 255.0)


def center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Center crop ``(..., H, W)`` to ``size x size`` (offsets rounded as torchvision's CenterCrop)."""
    h, w = frames.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {h}x{w} frames to {size}x{size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return frames[..., top:top + size, left:left + size]


_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)


def normalize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` RGB -> float32 ``(T, 3, size, size)``: resize the short side to ``size``
    when it differs, center crop, /255, CLIP mean/std.

    When no resize is needed (videos preprocessed to ``size``) the crop is taken on the uint8 frames
    before anything else, so only the kept ``size x size`` pixels are transposed and converted to
    float; the arithmetic runs in place, in the same order as ``(x / 255 - mean) / std``.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2)
    if min(x.shape[-2:]) == size:
        x = center_crop(x, size).contiguous().float()
    else:
        x = center_crop(resize_short_side(x.float(), size), size).contiguous()
    return x.div_(255.0).sub_(_MEAN).div_(_STD)


def load_video(path: str, max_frames: int, size: int, train: bool, start: Optional[float] = None,
               end: Optional[float] = None, frame_order: int = FRAME_ORDER_NORMAL,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled frames as the model input: ``video`` float ``(T, 3, size, size)``, ``mask`` ``(T,)``.

    Each distinct sampled frame is decoded, cropped and normalised once; the output order (and the
    padding of short videos) is applied to the normalised frames.
    """
    decoded, take, mask = read_unique_frames(path, max_frames, train, start, end, frame_order, generator)
    return _gather(normalize_frames(decoded, size), take), mask
