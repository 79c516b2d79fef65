"""Video files -> DGL video features, with evaluation's frame sampling and pixel path.

Each video goes through ``dataloaders.video.load_video(..., train=False)`` (segment centres, the
evaluation transform), so an indexed video gets the feature evaluation would give it. A video that
cannot be read becomes an error record in the batch, never an exception in a worker.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dataloaders.video import KeptReader, load_video
from runtime.errors import first_line

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                    ".ts", ".ogv")


def find_videos(roots, exclude: str | None = None) -> list[str]:
    """Video files (by extension, case-insensitive) under ``roots`` (folders, recursively, or files),
    as sorted absolute paths; hidden folders and ``exclude`` (the index folder) are skipped."""
    exclude = os.path.abspath(exclude) if exclude else None
    found = set()
    for root in roots:
        root = os.path.abspath(root)
        if os.path.isfile(root):
            found.add(root)
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and os.path.join(folder, d) != exclude)
            found.update(os.path.join(folder, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS))
    return sorted(found)


def file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": path, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


# a new index's defaults; an index that does not record "ranges" was made before frame-accurate ranges and
# reads its ranges in whole seconds (retrieval.index.recorded_transform)
TRANSFORM_DEFAULTS = {"resize_short_side": False, "decoder": "decord", "ranges": "frames"}
RANGE_RULES = {"frames": "frames", "seconds": "published"}  # an index's "ranges" -> load_video's span_rule


def read_for_model(path: str, max_frames: int, size: int, start: float | None = None, end: float | None = None,
                   resize_short_side: bool = False, decoder: str = "decord",
                   ranges: str = "seconds", kept: KeptReader | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(video (T, 3, size, size), mask (T,), metadata): the evaluation input of one file, or of its range
    ``start``..``end`` seconds: read to the frame with ``ranges="frames"``
    (:func:`dataloaders.video.exact_frame_span`), in whole seconds with ``"seconds"`` (the datasets' span
    rule, :func:`dataloaders.video.clip_frame_span`).

    ``kept`` (dataloaders.video.KeptReader): keeps the file open for the next range of it.

    Raises dataloaders.video.VideoDecodeError naming the file when it cannot be read.
    """
    video, mask, info = load_video(path, max_frames, size, train=False, start=start, end=end,
                                   resize_short_side=resize_short_side, decoder=decoder,
                                   span_rule=RANGE_RULES[ranges], kept=kept)  # one read of the file
    used = list(info.frame_indices[: int(mask.sum())])
    meta = {"num_frames": info.num_frames, "fps": round(info.fps, 4),
            "duration": round(info.duration, 3) if info.duration is not None else None, "frames_used": used}
    return video, mask, meta


def probe_duration(path: str, decoder: str = "decord") -> float | None:
    """Seconds of ``path`` (frames / average rate) as the chosen decoder counts them; None when the rate is
    unknown. Raises VideoDecodeError naming the file."""
    frames, fps = probe_frames(path, decoder)
    return frames / fps if fps > 0 else None


def probe_frames(path: str, decoder: str = "decord") -> tuple[int, float]:
    """(frames, average rate; 0.0 when unknown) of ``path`` as the chosen decoder counts them. Raises
    VideoDecodeError naming the file."""
    from dataloaders.video import VideoDecodeError, open_video

    if decoder == "pyav":
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoDecodeError(path, "no video stream (zero frames)")
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else 0.0
                frames = int(stream.frames or 0) or sum(1 for _ in container.decode(stream))
        except VideoDecodeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise VideoDecodeError(path, f"undecodable ({type(err).__name__})") from err
    else:
        reader = open_video(path)
        frames, fps = len(reader), float(reader.get_avg_fps() or 0.0)
        del reader
    return frames, fps


class FilePlans(Dataset):
    """Item i: the ranges of ``paths[i]`` under ``segmentation`` (retrieval.segments), or the reason why not.
    ``durations``: a whole file also gets its duration ("duration", None when unknown), which a run split
    between processes balances by."""

    def __init__(self, paths: list[str], segmentation, decoder: str, ranges: str = "seconds",
                 durations: bool = False):
        self.paths, self.segmentation, self.decoder, self.ranges = paths, segmentation, decoder, ranges
        self.durations = durations

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from retrieval.segments import plan_frame_ranges, plan_ranges

        path = self.paths[i]
        try:
            if self.segmentation.mode == "whole":
                plan = {"index": i, "ranges": [(None, None)]}
                if self.durations:
                    try:  # an unreadable file is the decoder's to report, as in a single-process run
                        plan["duration"] = probe_duration(path, self.decoder)
                    except Exception:  # noqa: BLE001
                        plan["duration"] = None
                return plan
            if self.ranges == "frames":
                frames, fps = probe_frames(path, self.decoder)
                return {"index": i, "ranges": plan_frame_ranges(self.segmentation, path, frames, fps)}
            duration = probe_duration(path, self.decoder)
            return {"index": i, "ranges": plan_ranges(self.segmentation, path, duration)}
        except Exception as err:  # noqa: BLE001 - an unreadable file is skipped and listed
            return {"index": i, "error": first_line(err)}


def _only_item(items: list) -> dict:
    return items[0]


def plan_loader(paths: list[str], segmentation, decoder: str, workers: int, ranges: str = "seconds",
                durations: bool = False) -> DataLoader:
    return DataLoader(FilePlans(paths, segmentation, decoder, ranges, durations), batch_size=1, shuffle=False,
                      num_workers=workers, collate_fn=_only_item)


def assign_shares(weights: list[float], batch_size: int, processes: int) -> list[tuple[int, int]]:
    """Each process's share of the items to encode: ``processes`` contiguous runs ``(lo, hi)`` of the item
    list, disjoint and together the whole list, with about the same total weight (seconds of video).

    Shares are made of whole batches of the list (``lo`` is a multiple of ``batch_size``), so every batch
    the model sees holds the same items whatever the number of processes: the features do not depend on
    how the work was split. A share may be empty (fewer batches than processes). Each cut is the batch
    boundary nearest to its fraction of the total weight; a share is off balance by at most about one
    batch's weight."""
    n = len(weights)
    starts = list(range(0, n, batch_size))
    known = [float(w) for w in weights if w is not None and w > 0]
    fill = sum(known) / len(known) if known else 1.0  # an unknown duration counts as an average one
    cumulative = [0.0]
    for lo in starts:
        cumulative.append(cumulative[-1] + sum(float(w) if w is not None and w > 0 else fill
                                               for w in weights[lo:lo + batch_size]))
    total = cumulative[-1]
    cuts, j = [0], 0
    for k in range(1, processes):
        target = total * k / processes
        while j + 1 < len(cumulative) and abs(cumulative[j + 1] - target) <= abs(cumulative[j] - target):
            j += 1
        cuts.append(j)
    cuts.append(len(starts))
    bounds = [min(n, c * batch_size) for c in cuts]
    return [(bounds[k], bounds[k + 1]) for k in range(processes)]


class VideoFiles(Dataset):
    """Item i: the model input of ``items[i]`` (a path, or (path, start, end) seconds), or the reason it
    could not be read. Consecutive ranges of a file are read through one open reader (KeptReader)."""

    def __init__(self, items: list, max_frames: int, size: int, resize_short_side: bool = False,
                 decoder: str = "decord", ranges: str = "seconds"):
        self.items, self.max_frames, self.size = items, max_frames, size
        self.resize_short_side, self.decoder, self.ranges = resize_short_side, decoder, ranges
        self.kept = KeptReader()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        path, start, end = (item, None, None) if isinstance(item, str) else item[:3]
        try:
            video, mask, meta = read_for_model(path, self.max_frames, self.size, start, end,
                                               self.resize_short_side, self.decoder, self.ranges, self.kept)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped and listed
            return {"index": i, "error": first_line(err)}
        return {"index": i, "video": video, "mask": mask, "meta": meta}


def collate_videos(items: list[dict]) -> dict:
    good = [it for it in items if "error" not in it]
    return {
        "errors": [(it["index"], it["error"]) for it in items if "error" in it],
        "index": [it["index"] for it in good],
        "meta": [it["meta"] for it in good],
        "video": torch.stack([it["video"] for it in good]) if good else None,  # (B, T, 3, S, S)
        "mask": torch.stack([it["mask"] for it in good]) if good else None,    # (B, T)
    }


def video_loader(items: list, max_frames: int, size: int, batch_size: int, workers: int,
                 resize_short_side: bool = False, decoder: str = "decord", ranges: str = "seconds",
                 pin_memory: bool = False) -> DataLoader:
    """Batches of :class:`VideoFiles` in item order, decoded by ``workers`` processes ahead of the model (two
    batches each, DataLoader's default); ``pin_memory``: page-locked batches, for a quick copy to a GPU."""
    return DataLoader(VideoFiles(items, max_frames, size, resize_short_side, decoder, ranges), batch_size=batch_size,
                      shuffle=False, num_workers=workers, collate_fn=collate_videos, pin_memory=pin_memory)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for ``auto`` only where the hardware computes it natively; None means fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    from modules.backends import cpu_has_native_bf16

    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def compile_video_encoder(model, log=None, batch_size: int | None = None):
    """``torch.compile`` of ``model.encode_video`` in place (``search_videos.py index --compile``). The first
    batch of each shape compiles (minutes on a CPU; the time goes to ``log``), so it pays on long runs only.
    Features equal the plain ones to float rounding, not bit for bit.

    ``batch_size``: a batch of fewer videos (a run's last batch, or one that lost an unreadable video) is
    padded to this many by repeating its last video, and the padded rows' features are dropped, so that the
    run compiles one graph: a new batch size would compile a second one, about as long as the first. Each
    video's feature depends on that video alone, so the padding changes no real row's computation."""
    import time

    compiled = torch.compile(model.encode_video)
    seen = set()

    def encode_video(video, mask, *args, **kwargs):
        rows = video.shape[0]
        if batch_size is not None and 0 < rows < batch_size:
            video, mask = _padded(video, batch_size), _padded(mask, batch_size)
        if tuple(video.shape) in seen:
            return compiled(video, mask, *args, **kwargs)[:rows]
        start = time.perf_counter()
        out = compiled(video, mask, *args, **kwargs)
        seen.add(tuple(video.shape))
        if log:
            log(f"torch.compile: video encoder, batch {'x'.join(map(str, video.shape))}: first call "
                f"{time.perf_counter() - start:.1f}s (compilation included)")
        return out[:rows]

    model.encode_video = encode_video
    return model


def _padded(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``rows`` (B, ...) with its last row repeated up to ``size`` rows."""
    return torch.cat([rows, rows[-1:].expand(size - rows.shape[0], *rows.shape[1:])])


@torch.no_grad()
def encode_batch(model, video: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """L2-normalised float32 CPU video features (B, D)."""
    device = next(model.parameters()).device
    ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with ctx:
        features = model.encode_video(video.to(device, non_blocking=True), mask.to(device, non_blocking=True))
    return F.normalize(features.float(), dim=-1).cpu()


def frames_as_seen(video: torch.Tensor) -> torch.Tensor:
    """Normalised model input (T, 3, S, S) -> uint8 RGB (T, S, S, 3): the pixels the model saw."""
    from dataloaders.video import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (video.float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
