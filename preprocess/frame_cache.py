"""Build a decoded-frame cache: the frames the loader samples, decoded once, cropped to the model's input
size, in memory-mapped shards that ``main.py --frame_cache DIR`` reads instead of decoding the videos.

    python -m preprocess.frame_cache --out CACHE --videos VIDEO_DIR [VIDEO_DIR ...] [--frames all|eval]
                                     [--max_frames 12] [--size 224] [--decoder decord|pyav]
                                     [--encoding raw|jpeg] [--quality 90] [--shard_mb 512]
    python -m preprocess.frame_cache --out CACHE --video_list clips.txt --frames eval

``--frames all`` (for training: random frames are drawn from every segment) stores every frame of each
video (of its clip, for a ``--video_list`` line with start/end seconds); ``--frames eval`` stores only the
``--max_frames`` evaluation frames (segment centres), about ``max_frames / frames`` of the size. A
``--video_list`` file has one video per line: ``path`` or ``path start end`` (seconds, as the dataset's
annotation gives them).

``--encoding raw`` stores uint8 pixels: the model input is the same, bit for bit, as decoding the file.
``--encoding jpeg`` stores each frame as a JPEG at ``--quality`` (smaller; the pixels differ by the
JPEG error, see docs/data-loading.md).

The cache is built incrementally: videos already cached unchanged (same size and modification time)
are skipped, new or changed ones are appended in new shards. Each shard is written under a temporary
name and renamed, its entries last, so a killed build leaves complete shards that a reader uses and the
next build continues after them. The format is described in ``dataloaders/frame_cache.py``.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time
from typing import Callable, Optional

import numpy as np

from dataloaders.base import VIDEO_EXTENSIONS
from dataloaders.frame_cache import (ENCODINGS, FORMAT, FRAME_SETS, MANIFEST, SHARD_DIR, FrameCache,
                                     FrameCacheError, complete_shards, file_stamp, needed_frames, read_manifest,
                                     shard_paths, video_key)
from dataloaders.video import DECODERS, VideoDecodeError, center_crop, decode_planned
from runtime.errors import OneLineArgumentParser, fail, finite_float, first_line
from runtime.files import atomic_write, remove_stale_temporary_files


def crop_frames(decoded, size: int) -> np.ndarray:
    """uint8 (U, H, W, 3) -> uint8 (U, size, size, 3): the published centre crop / zero padding, on uint8
    exactly as ``dataloaders.video.normalize_frames`` takes it."""
    return center_crop(decoded.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).contiguous().numpy()


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # 4:4:4: chroma subsampling of a crop whose grid differs from the video's costs 3-4x the error
    Image.fromarray(frame).save(buf, format="JPEG", quality=int(quality), subsampling=0)
    return buf.getvalue()


def _write_json(path: str, data) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data) + "\n"), mode="w")


def _write_npy(path: str, chunks: list, shape: tuple) -> None:
    def write(f):
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk).tobytes())
    atomic_write(path, write)


def _manifest(size: int, decoder: str, encoding: str, quality: int) -> dict:
    m = {"format": FORMAT, "size": int(size), "decoder": decoder, "encoding": encoding}
    if encoding == "jpeg":
        m["quality"] = int(quality)
    return m


def prepare_folder(out: str, manifest: dict) -> None:
    """Create the cache folder or check that it was built with the same settings; clear what an
    interrupted build left (temporary files, frames of a shard whose entries were never written)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FrameCacheError(f"--out {out} is a file, not a folder")
    if os.path.exists(os.path.join(out, MANIFEST)):
        old = read_manifest(out)
        if {k: old.get(k) for k in manifest} != manifest:
            raise FrameCacheError(f"frame cache {out} was built with {json.dumps(old)}, not {json.dumps(manifest)}; "
                                  f"use another --out")
    else:
        if os.path.isdir(out) and [n for n in os.listdir(out) if not n.startswith("." + MANIFEST + ".")]:
            # a run folder or a folder of videos, say (a killed first build leaves at most its manifest's temporary)
            raise FrameCacheError(f"--out {out} holds other files and no {MANIFEST}: it is not a frame cache; "
                                  f"give a new or empty folder")
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, MANIFEST), manifest)
    shards = os.path.join(out, SHARD_DIR)
    os.makedirs(shards, exist_ok=True)
    remove_stale_temporary_files(shards)
    done = set(complete_shards(out))
    for npy in glob.glob(os.path.join(shards, "shard-*.npy")):
        try:
            number = int(os.path.basename(npy)[len("shard-"):-len(".npy")])
        except ValueError:
            continue
        if number not in done:
            os.unlink(npy)


class ShardWriter:
    """Collects cropped frames of videos and writes them as a shard once ``shard_bytes`` are held."""

    def __init__(self, out: str, encoding: str, quality: int, shard_bytes: int,
                 on_shard: Optional[Callable[[int], None]] = None, frame_set: Optional[dict] = None):
        self.out, self.encoding, self.quality = out, encoding, quality
        self.frame_set = dict(frame_set or {})  # {"frames": all|eval, "max_frames": N}, recorded in each shard
        self.shard_bytes, self.on_shard = max(1, int(shard_bytes)), on_shard
        numbers = complete_shards(out)
        self.next_number = (numbers[-1] + 1) if numbers else 0
        self.written: list[int] = []
        self._reset()

    def _reset(self):
        self.entries, self.chunks, self.rows, self.bytes, self.offsets = [], [], 0, 0, [0]

    def add(self, entry: dict, frames: np.ndarray) -> None:
        entry = dict(entry, row=self.rows)
        if self.encoding == "jpeg":
            for frame in frames:
                data = np.frombuffer(encode_jpeg(frame, self.quality), np.uint8)
                self.chunks.append(data)
                self.offsets.append(self.offsets[-1] + len(data))
                self.bytes += len(data)
        else:
            self.chunks.append(frames)
            self.bytes += frames.nbytes
        self.rows += len(frames)
        self.entries.append(entry)
        if self.bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.entries:
            return
        number = self.next_number
        npy, entries_path = shard_paths(self.out, number)
        if self.encoding == "jpeg":
            shape = (self.offsets[-1],)
        else:
            shape = (self.rows,) + tuple(self.chunks[0].shape[1:])
        _write_npy(npy, self.chunks, shape)
        data = {"entries": self.entries, **self.frame_set}
        if self.encoding == "jpeg":
            data["offsets"] = self.offsets
        _write_json(entries_path, data)  # last: the shard exists from here on
        self.next_number += 1
        self.written.append(number)
        self._reset()
        if self.on_shard is not None:
            self.on_shard(number)


def _already_cached(entries: list, frames: str, start, end, max_frames: int) -> bool:
    for old in entries:
        try:
            wanted = needed_frames(frames, old.num_frames, old.fps, start, end, max_frames, old.listed_frames)
        except ValueError:
            return False
        if np.isin(wanted, old.frames).all():
            return True
    return False


def build_frame_cache(out: str, videos: list, frames: str = "all", max_frames: int = 12, size: int = 224,
                      decoder: str = "decord", encoding: str = "raw", quality: int = 90, shard_mb: float = 512,
                      on_shard: Optional[Callable[[int], None]] = None, log: Optional[Callable] = print) -> dict:
    """Cache the frames of ``videos`` (paths, or (path, start, end) with seconds) under ``out``.

    Returns counts: cached (new or changed videos written), skipped (already cached unchanged), failed
    ({path: reason}), shards written, frames written, seconds.
    """
    if frames not in FRAME_SETS:
        raise ValueError(f"frames must be one of {FRAME_SETS}, got {frames!r}")
    if decoder not in DECODERS or encoding not in ENCODINGS:
        raise ValueError(f"decoder must be one of {DECODERS} and encoding one of {ENCODINGS}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"--quality must be 1..100, got {quality}")
    t0 = time.time()
    prepare_folder(out, _manifest(size, decoder, encoding, quality))
    cache = FrameCache(out)
    writer = ShardWriter(out, encoding, quality, int(shard_mb * (1 << 20)), on_shard,
                         {"frames": frames, "max_frames": int(max_frames)})
    skipped, cached, failed, frames_written = 0, 0, {}, 0
    for item in videos:
        path, start, end = (item, None, None) if isinstance(item, str) else (tuple(item) + (None, None))[:3]
        if _already_cached(cache.entries(path) if os.path.isfile(path) else [], frames, start, end, max_frames):
            skipped += 1
            continue
        listed = {}

        def plan(num_frames, fps, listed_frames=0):
            listed["frames"] = listed_frames
            wanted = needed_frames(frames, num_frames, fps, start, end, max_frames, listed_frames)
            return wanted, len(wanted)

        try:
            stamp = file_stamp(path)
            decoded, wanted, _, _, num_frames, fps = decode_planned(path, plan, decoder)
        except (VideoDecodeError, OSError) as exc:
            failed[path] = str(exc)
            if log:
                log(f"skipped (not cached): {exc}")
            continue
        if file_stamp(path) != stamp:
            failed[path] = "changed while it was read"
            continue
        entry = {"path": video_key(path), "size": stamp[0], "mtime_ns": stamp[1], "num_frames": num_frames,
                 "fps": fps, "listed_frames": listed.get("frames", 0), "frames": list(map(int, wanted))}
        writer.add(entry, crop_frames(decoded, size))
        cached += 1
        frames_written += len(wanted)
    writer.flush()
    summary = {"cached": cached, "skipped": skipped, "failed": failed, "shards": writer.written,
               "frames": frames_written, "seconds": time.time() - t0}
    if log:
        log(f"frame cache {out}: {cached} video(s) cached ({frames_written} frames, {len(writer.written)} "
            f"shard(s)), {skipped} already cached, {len(failed)} failed, {summary['seconds']:.1f} s")
    return summary


def read_video_list(path: str) -> list:
    """Lines ``path`` or ``path start end`` (seconds); relative paths are taken from the list's folder."""
    base = os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            video = parts[0] if os.path.isabs(parts[0]) else os.path.join(base, parts[0])
            if len(parts) == 1:
                items.append(video)
            elif len(parts) == 3:
                try:
                    items.append((video, float(parts[1]), float(parts[2])))
                except ValueError:
                    raise ValueError(f"{path} line {number}: start and end must be seconds, got {parts[1:]}")
            else:
                raise ValueError(f"{path} line {number}: expected 'path' or 'path start end', got {line.strip()!r}")
    return items


def find_videos(folders: list) -> list:
    found = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise ValueError(f"--videos {folder}: no such folder")
        for dirpath, _dirs, names in os.walk(folder):
            for name in names:
                if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS and not name.startswith("."):
                    found.append(os.path.join(dirpath, name))
    return sorted(found)


def parse_args(argv=None):
    p = OneLineArgumentParser(prog="python -m preprocess.frame_cache", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="cache folder (created; an existing cache is extended; another "
                                                "folder must be empty)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", nargs="+", help="folders of videos (searched recursively)")
    src.add_argument("--video_list", help="text file: one 'path' or 'path start end' per line")
    p.add_argument("--frames", choices=FRAME_SETS, default="all",
                   help="all: every frame (training samples random frames); eval: the evaluation frames only")
    p.add_argument("--max_frames", type=int, default=12, help="frames per clip of the run (--frames eval)")
    p.add_argument("--size", type=int, default=224, help="the model's input size: the CLIP's input resolution (224 for ViT-B/32 and B/16)")
    p.add_argument("--decoder", choices=DECODERS, default="decord", help="as main.py --video_decoder")
    p.add_argument("--encoding", choices=ENCODINGS, default="raw",
                   help="raw: uint8 pixels, bit-identical model input; jpeg: smaller, within the JPEG error")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (--encoding jpeg)")
    p.add_argument("--shard_mb", type=finite_float, default=512, help="size of a shard in MiB")
    a = p.parse_args(argv)
    if a.max_frames < 1 or a.size < 1 or a.shard_mb <= 0:
        p.error("--max_frames, --size and --shard_mb must be positive")
    if not 1 <= a.quality <= 100:
        p.error(f"--quality must be 1..100, got {a.quality}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        videos = read_video_list(a.video_list) if a.video_list else find_videos(a.videos)
        if not videos:
            raise ValueError("no video found (" + (f"--video_list {a.video_list}" if a.video_list else
                                                    f"--videos {' '.join(a.videos)}") + ")")
        summary = build_frame_cache(a.out, videos, a.frames, a.max_frames, a.size, a.decoder, a.encoding,
                                    a.quality, a.shard_mb)
    except (ValueError, OSError) as exc:
        fail(first_line(exc), prog="python -m preprocess.frame_cache")
    return 1 if summary["failed"] and not (summary["cached"] or summary["skipped"]) else 0


if __name__ == "__main__":
    sys.exit(main())
