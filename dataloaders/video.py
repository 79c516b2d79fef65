"""Frame sampling, decoding (decord, sparse; or PyAV, as published) and CLIP pixel transforms (torch only).

Sampling follows section 5 of the DGL spec and the published ``sampling.py``:

* training: the ``N`` frames are cut into ``T`` segments of ``N // T`` frames and one frame is drawn
  at a random offset inside each segment (frames past ``T * (N // T)`` are never drawn, as published);
* evaluation: the centre of each of ``T`` segments of ``N / T`` frames, ``int(tick / 2 + tick * t)``;
* a video with ``N <= T`` frames takes every frame once and repeats its last frame; the mask marks the
  ``min(N, T)`` real frames;
* a clip given by start/end seconds (ActivityNet, DiDeMo) is cut as the published loaders cut it
  (:func:`published_clip_seconds`, :func:`clip_frame_span`).

Pixels (:func:`normalize_frames`), as the published transform makes them: no resize; a centre crop of
the model's input size at the native resolution, zero-padded (before the normalisation) where a side is
smaller; /255; CLIP's mean and std. Resizing the short side first is an opt-in (``resize_short_side``).

Decoders (``decoder=``): ``"decord"`` (default) converts and copies out only the sampled frames (one
``VideoReader.get_batch`` of the sorted distinct indices); decord decodes forward from the last
keyframe at or before each requested frame (see ``preprocess/compress_video.py``). ``"pyav"`` decodes
every frame in order and converts the sampled ones, as the published loader does: slower, and the
reference when decord's seeking is in doubt (open-GOP files, see the README).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# frame order flags of the published code: 0 normal, 1 reverse, 2 random
FRAME_ORDER_NORMAL, FRAME_ORDER_REVERSE, FRAME_ORDER_RANDOM = 0, 1, 2
FRAME_ORDERS = (FRAME_ORDER_NORMAL, FRAME_ORDER_REVERSE, FRAME_ORDER_RANDOM)

DECODERS = ("decord", "pyav")


class VideoDecodeError(RuntimeError):
    """A video could not be read: missing, empty, truncated, undecodable or without frames."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What the decoder learnt about a file while reading it, so that no caller opens it a second time."""
    num_frames: int  # frames of the file (PyAV: the decoded count)
    fps: float  # the stream's average rate; 0.0 when the file does not say
    frame_indices: tuple  # file frame index of each of the max_frames outputs (padding repeats the last)

    @property
    def duration(self) -> Optional[float]:
        """Seconds (frames / average rate); None when the rate is unknown."""
        return self.num_frames / self.fps if self.fps > 0 else None


class DecodedFrames(NamedTuple):
    decoded: torch.Tensor  # uint8 (U, H, W, 3): the U distinct sampled frames, ascending
    take: list  # max_frames positions into ``decoded`` giving the output order, padding included
    mask: torch.Tensor  # int64 (max_frames,): 1 for real frames
    info: VideoInfo


class VideoClip(NamedTuple):
    video: torch.Tensor  # float (T, 3, size, size): the model input
    mask: torch.Tensor  # int64 (T,)
    info: VideoInfo


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


def published_clip_seconds(start: float, end: float) -> tuple[int, int]:
    """Start/end seconds as the published loaders use them: cut to int (toward zero), negative -> 0,
    swapped when start > end, end + 1 when they are equal."""
    start, end = max(int(start), 0), max(int(end), 0)
    if start > end:
        start, end = end, start
    elif start == end:
        end += 1
    return start, end


def clip_frame_span(num_frames: int, fps: float, start: Optional[float], end: Optional[float],
                    listed_frames: int = 0) -> tuple[int, int]:
    """``(first, count)``: the frames ``first .. first + count - 1`` that the published loader samples from.

    ``num_frames`` frames were decoded; ``listed_frames`` is the container's frame count when known
    (PyAV ``stream.frames``; 0 = unknown) and caps the count as published. Without start/end: the whole
    video. With them (seconds, see :func:`published_clip_seconds`): frame indices in the inclusive range
    ``[int(start * fps), min(int(end * fps), frames)]``, fps the stream's average rate.
    Raises ``ValueError`` when the clip holds no frame.
    """
    listed = listed_frames if listed_frames and listed_frames > 0 else num_frames
    if start is None or end is None:
        return 0, min(listed, num_frames)
    if not fps or fps <= 0:
        raise ValueError("unknown frame rate, cannot cut a clip by time")
    start_s, end_s = published_clip_seconds(start, end)
    first = int(start_s * fps)
    last = min(int(end_s * fps), listed, num_frames - 1)
    count = min(listed, last - first + 1)
    if count <= 0:
        raise ValueError(f"the clip {start_s}-{end_s} s starts at frame {first} but the video has "
                         f"{num_frames} frames at {fps:g} fps")
    return first, count


SPAN_RULES = ("published", "frames")


def exact_frame_span(num_frames: int, fps: float, start: float, end: float) -> tuple[int, int]:
    """``(first, count)`` of the range ``[start, end)`` seconds read to the frame (``span_rule="frames"``).

    Frame ``i`` shows ``[i / fps, (i + 1) / fps)``; the range holds the frames ``round(start * fps)`` up to
    (not including) ``round(end * fps)``, so a range made as ``(first / fps, stop / fps)`` reads exactly the
    frames ``first .. stop - 1``. Unlike the datasets' rule (:func:`clip_frame_span`) nothing is cut to whole
    seconds. Raises ``ValueError`` when the range is shorter than one frame or the stream has no frame in it.
    """
    if not fps or fps <= 0:
        raise ValueError("unknown frame rate, cannot cut a range by time")
    first, stop = int(round(start * fps)), int(round(end * fps))
    if stop - first < 1 or first < 0:
        raise ValueError(f"the range {start:g}-{end:g} s is shorter than one frame ({fps:g} fps)")
    if first >= num_frames:
        raise ValueError(f"the stream has no frames in the range {start:g}-{end:g} s (frames {first}-{stop - 1}; "
                         f"it has {num_frames} frames at {fps:g} fps)")
    return first, min(stop, num_frames) - first


def time_to_frame_range(num_frames: int, fps: float, start: Optional[float],
                        end: Optional[float]) -> tuple[int, int]:
    """Inclusive frame range ``[first, last]`` of the clip ``[start, end]`` seconds (whole video when
    either is None), as :func:`clip_frame_span` cuts it."""
    first, count = clip_frame_span(num_frames, fps, start, end)
    return first, first + count - 1


def _check_file(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    return path


def open_video(path: str, num_threads: int = 1):
    """A decord ``VideoReader`` with clear errors for missing, empty and undecodable files."""
    path = _check_file(path)
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


class KeptReader:
    """The decord reader of the last file read, kept open for the next read of the same file while it is
    unchanged (its device, inode, size and modification time): the ranges of one long file, read one after
    another, open it once. Each read starts where a newly opened reader starts (the reader is sought back to
    the first frame), so a range's frames never depend on what was read before it (decord's sparse reads of
    open-GOP files depend on where the decoder stands). One per process: a data worker gets its own (a copy
    holds no reader)."""

    def __init__(self):
        self.key, self.reader = None, None

    def __getstate__(self):
        return {"key": None, "reader": None}

    def get(self, path: str, num_threads: int):
        try:
            st = os.stat(path)
            key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, num_threads)
        except OSError:
            key = None
        if key is None or key != self.key:
            self.drop()
            reader = open_video(path, num_threads=num_threads)
            if key is not None:
                self.key, self.reader = key, reader
            return reader
        self.reader.seek(0)
        return self.reader

    def drop(self) -> None:
        self.key, self.reader = None, None


def _sampled_indices(num_frames: int, fps: float, max_frames: int, train: bool, start: Optional[float],
                     end: Optional[float], frame_order: int, generator: Optional[torch.Generator],
                     listed_frames: int = 0, span_rule: str = "published") -> tuple[list[int], int]:
    """Absolute frame indices in output order (padding included) and the number of real frames."""
    if span_rule == "frames" and start is not None and end is not None:
        first, n = exact_frame_span(num_frames, fps, start, end)
    else:
        first, n = clip_frame_span(num_frames, fps, start, end, listed_frames)
    sampler = sample_train_indices(n, max_frames, generator) if train else sample_eval_indices(n, max_frames)
    num_valid = min(n, max_frames)
    order = apply_frame_order(sampler, num_valid, frame_order, generator)
    return [first + i for i in order], num_valid


# a frame plan: (num_frames, fps, listed_frames=) -> (absolute indices in output order, number of real frames)
FramePlan = Callable[..., tuple]


def _batch_to_tensor(batch) -> torch.Tensor:
    """A decord NDArray as a uint8 tensor without another copy (DLPack), else through numpy."""
    try:
        from torch.utils.dlpack import from_dlpack

        return from_dlpack(batch.to_dlpack())
    except Exception:  # pragma: no cover - depends on the decord/torch builds
        return torch.from_numpy(batch.asnumpy())


def _plan_or_fail(path: str, plan: FramePlan, num_frames: int, fps: float, listed: int) -> tuple[list[int], int]:
    try:
        return plan(num_frames, fps, listed_frames=listed)
    except ValueError as exc:
        raise VideoDecodeError(path, str(exc)) from exc


def _decode_decord(path: str, plan: FramePlan, num_threads: int,
                   kept: KeptReader | None = None) -> tuple[torch.Tensor, list[int], list[int], int, int, float]:
    """decord: only the planned frames are decoded forward from their keyframes and converted."""
    reader = kept.get(path, num_threads) if kept is not None else open_video(path, num_threads=num_threads)
    try:
        num_frames = len(reader)
        fps = float(reader.get_avg_fps() or 0.0)
        order, num_valid = _plan_or_fail(path, plan, num_frames, fps, 0)
        wanted = sorted(set(order))
        try:
            batch = reader.get_batch(wanted)
        except Exception as exc:
            if kept is not None:
                kept.drop()
            raise VideoDecodeError(path, f"decoding frames {wanted[0]}..{wanted[-1]} of {num_frames} failed "
                                         f"(truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
    finally:
        del reader
    return _batch_to_tensor(batch), wanted, order, num_valid, num_frames, fps


def _decode_pyav(path: str, plan: FramePlan) -> tuple[torch.Tensor, list[int], list[int], int, int, float]:
    """PyAV, as the published loader: every frame decoded in order, the planned ones converted to RGB
    (``to_rgb().to_ndarray()``); the container's frame count and average rate are used as published."""
    _check_file(path)
    import av  # imported lazily: PyAV is only needed for this decoder

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "no video stream (zero frames)")
            stream = container.streams.video[0]
            listed = int(stream.frames or 0)
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            frames = list(container.decode(stream))
    except VideoDecodeError:
        raise
    except Exception as exc:  # av.FFmpegError and friends
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise VideoDecodeError(path, f"undecodable or truncated ({type(exc).__name__}: {detail})") from exc
    if not frames:
        raise VideoDecodeError(path, "the video has zero frames")
    order, num_valid = _plan_or_fail(path, plan, len(frames), fps, listed)
    wanted = sorted(set(order))
    decoded = torch.from_numpy(np.stack([frames[i].to_rgb().to_ndarray() for i in wanted]))
    return decoded, wanted, order, num_valid, len(frames), fps


class _RememberedPlan:
    """A frame plan drawn at most once per (num_frames, fps, listed_frames): the frame cache and, when it
    cannot serve a clip, the decoder then ask for the same plan without drawing the random offsets again
    (the run's random stream is the same with and without a cache)."""

    def __init__(self, plan: FramePlan):
        self.plan = plan
        self.made: dict = {}

    def __call__(self, num_frames: int, fps: float, listed_frames: int = 0) -> tuple:
        key = (num_frames, fps, listed_frames)
        if key not in self.made:
            self.made[key] = self.plan(num_frames, fps, listed_frames=listed_frames)
        return self.made[key]


def decode_planned(path: str, plan: FramePlan, decoder: str = "decord", num_threads: int = 1,
                   kept: KeptReader | None = None) -> tuple[torch.Tensor, list[int], list[int], int, int, float]:
    """Decode the frames a plan asks for: ``(decoded uint8 (U, H, W, 3), wanted (the U sorted distinct
    indices), order, num_valid, num_frames, fps)``. ``plan(num_frames, fps, listed_frames=)`` returns the
    absolute indices in output order and the number of real frames (see :func:`read_unique_frames`).
    ``kept`` (decord): read through the :class:`KeptReader`, which keeps the file open for the next read."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "pyav":
        out = _decode_pyav(path, plan)
    else:
        out = _decode_decord(path, plan, num_threads, kept)
    decoded, wanted = out[0], out[1]
    if decoded.ndim != 4 or decoded.shape[0] != len(wanted) or decoded.shape[-1] != 3:
        raise VideoDecodeError(path, f"decoder returned an array of shape {tuple(decoded.shape)}")
    return out


def read_unique_frames(path: str, max_frames: int, train: bool, start: Optional[float] = None,
                       end: Optional[float] = None, frame_order: int = FRAME_ORDER_NORMAL,
                       generator: Optional[torch.Generator] = None, num_threads: int = 1,
                       decoder: str = "decord", frame_cache=None, span_rule: str = "published",
                       kept: KeptReader | None = None) -> DecodedFrames:
    """Decode each sampled frame once, in file order.

    Returns :class:`DecodedFrames`: ``decoded`` uint8 ``(U, H, W, 3)`` (the ``U`` distinct sampled frames,
    ascending), ``take`` (``max_frames`` positions into ``decoded`` giving the output order, padding
    included), ``mask`` int64 ``(max_frames,)`` and the file's :class:`VideoInfo`. ``decoder``: ``"decord"`` (sparse: one ``get_batch`` of the
    sorted distinct indices) or ``"pyav"`` (decode everything, as published).
    ``frame_cache`` (a :class:`dataloaders.frame_cache.FrameCache`): the frames come from it when it holds
    them for this unchanged file (already cropped to the model's input size), else from the file.
    ``span_rule``: how ``start``/``end`` pick frames: ``"published"`` (the datasets' whole seconds,
    :func:`clip_frame_span`) or ``"frames"`` (to the frame, :func:`exact_frame_span`).
    ``kept``: see :func:`decode_planned`.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if span_rule not in SPAN_RULES:
        raise ValueError(f"span_rule must be one of {SPAN_RULES}, got {span_rule!r}")
    plan = functools.partial(_sampled_indices, max_frames=max_frames, train=train, start=start, end=end,
                             frame_order=frame_order, generator=generator, span_rule=span_rule)
    found = None
    if frame_cache is not None:
        plan = _RememberedPlan(plan)
        found = frame_cache.read(path, plan)
    decoded, wanted, order, num_valid, num_frames, fps = found or decode_planned(path, plan, decoder, num_threads,
                                                                                          kept)
    pos = {idx: k for k, idx in enumerate(wanted)}
    mask = torch.zeros(max_frames, dtype=torch.long)
    mask[:num_valid] = 1
    return DecodedFrames(decoded, [pos[i] for i in order], mask, VideoInfo(num_frames, fps, tuple(order)))


def _gather(x: torch.Tensor, take: list[int]) -> torch.Tensor:
    return x if take == list(range(x.shape[0])) else x[take]


def read_frames(path: str, max_frames: int, train: bool, start: Optional[float] = None,
                end: Optional[float] = None, frame_order: int = FRAME_ORDER_NORMAL,
                generator: Optional[torch.Generator] = None, num_threads: int = 1,
                decoder: str = "decord") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode only the sampled frames of ``path``.

    Returns ``frames`` uint8 ``(max_frames, H, W, 3)`` RGB and ``mask`` int64 ``(max_frames,)``.
    Raises :class:`VideoDecodeError` naming the file on any failure.
    """
    decoded, take, mask, _ = read_unique_frames(path, max_frames, train, start, end, frame_order, generator,
                                                num_threads, decoder)
    return _gather(decoded, take), mask


def resize_to_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
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


def pad_to_size(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``(..., H, W)`` so that both sides are at least ``size``, as torchvision's CenterCrop
    pads: left/top ``(size - w) // 2``, right/bottom the rest. Zero in uint8 and in ``x / 255`` alike."""
    h, w = frames.shape[-2:]
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h == 0 and pad_w == 0:
        return frames
    return F.pad(frames, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop of ``(..., H, W)`` to ``size x size``: zero padding where a side is
    smaller (:func:`pad_to_size`), then offsets ``int(round((h - size) / 2.0))`` (Python's round)."""
    frames = pad_to_size(frames, size)
    h, w = frames.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return frames[..., top:top + size, left:left + size]


_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)


def normalize_frames(frames: torch.Tensor, size: int, resize_short_side: bool = False) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` RGB -> float32 ``(T, 3, size, size)``, the published transform: centre crop
    at the native resolution (zero padding where a side is under ``size``), /255, CLIP mean/std.

    The crop (and padding) is taken on the uint8 frames, so only the kept ``size x size`` pixels are
    transposed and converted to float; since zero padding is zero after /255 and the arithmetic runs
    in place in the order of ``(x / 255 - mean) / std``, the result is bit for bit the published one.
    ``resize_short_side=True`` (opt-in, changes results) first scales the short side to ``size``
    (bicubic, antialiased), for videos that were not preprocessed.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames, got {frames.dtype} {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2)  # (T, 3, H, W)
    if resize_short_side and min(x.shape[-2:]) != size:
        x = center_crop(resize_to_short_side(x.float(), size), size).contiguous()
    else:
        x = center_crop(x, size).contiguous().float()
    return x.div_(255.0).sub_(_MEAN).div_(_STD)


def video_options(args) -> dict:
    """The pixel and decoder options of ``main.py`` (``--resize_short_side``, ``--video_decoder``) as
    keyword arguments of :func:`load_video`; absent flags take the published behaviour."""
    resize = getattr(args, "resize_short_side", None)
    decoder = getattr(args, "video_decoder", None) or "decord"
    if decoder not in DECODERS:
        raise ValueError(f"--video_decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "pyav":
        try:
            import av  # noqa: F401
        except ImportError as exc:
            raise ValueError("--video_decoder pyav needs PyAV (pip install av)") from exc
    return {"resize_short_side": bool(resize), "decoder": decoder}


def load_video(path: str, max_frames: int, size: int, train: bool, start: Optional[float] = None,
               end: Optional[float] = None, frame_order: int = FRAME_ORDER_NORMAL,
               generator: Optional[torch.Generator] = None, resize_short_side: bool = False,
               decoder: str = "decord", frame_cache=None, span_rule: str = "published",
               kept: KeptReader | None = None) -> VideoClip:
    """Sampled frames as the model input, with what the decoder learnt of the file: :class:`VideoClip`
    ``(video float (T, 3, size, size), mask (T,), info)``.

    Each distinct sampled frame is decoded, cropped and normalised once; the output order (and the
    padding of short videos) is applied to the normalised frames. ``frame_cache``: see
    :func:`read_unique_frames`; its frames are already cropped, so the model input is the same bit for bit.
    ``span_rule``: see :func:`read_unique_frames` (the datasets use ``"published"``); ``kept``: see
    :func:`decode_planned`.
    """
    if frame_cache is not None and resize_short_side:
        raise ValueError("a frame cache holds frames cropped without resizing: it cannot serve resize_short_side")
    decoded, take, mask, info = read_unique_frames(path, max_frames, train, start, end, frame_order, generator,
                                                   decoder=decoder, frame_cache=frame_cache, span_rule=span_rule,
                                                   kept=kept)
    return VideoClip(_gather(normalize_frames(decoded, size, resize_short_side), take), mask, info)
