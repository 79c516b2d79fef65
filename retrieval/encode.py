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

from dataloaders.video import load_video

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


def read_for_model(path: str, max_frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(video (T, 3, size, size), mask (T,), metadata): the evaluation input of one file.

    Raises dataloaders.video.VideoDecodeError naming the file when it cannot be read.
    """
    video, mask, info = load_video(path, max_frames, size, train=False)  # one read of the file
    used = list(info.frame_indices[: int(mask.sum())])
    meta = {"num_frames": info.num_frames, "fps": round(info.fps, 4),
            "duration": round(info.duration, 3) if info.duration is not None else None, "frames_used": used}
    return video, mask, meta


class VideoFiles(Dataset):
    """Item i: the model input of ``paths[i]``, or the reason it could not be read."""

    def __init__(self, paths: list[str], max_frames: int, size: int):
        self.paths, self.max_frames, self.size = paths, max_frames, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            video, mask, meta = read_for_model(path, self.max_frames, self.size)
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped and listed
            text = str(err).strip().splitlines()
            return {"index": i, "error": text[0] if text else type(err).__name__}
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


def video_loader(paths: list[str], max_frames: int, size: int, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(VideoFiles(paths, max_frames, size), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=collate_videos)


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


@torch.no_grad()
def encode_batch(model, video: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """L2-normalised float32 CPU video features (B, D)."""
    device = next(model.parameters()).device
    ctx = torch.autocast(device_type=device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with ctx:
        features = model.encode_video(video.to(device), mask.to(device))
    return F.normalize(features.float(), dim=-1).cpu()


def frames_as_seen(video: torch.Tensor) -> torch.Tensor:
    """Normalised model input (T, 3, S, S) -> uint8 RGB (T, S, S, 3): the pixels the model saw."""
    from dataloaders.video import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (video.float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
