"""Reading a decoded-frame cache: the frames a loader samples, already decoded and cropped, in
memory-mapped shards (built by ``python -m preprocess.frame_cache``).

Cache folder::

    frame_cache.json          format, the model input size, the decoder that read the videos, the
                              encoding ("raw" uint8 or "jpeg" and its quality)
    shards/shard-NNNNNN.npy   raw: uint8 (rows, size, size, 3), each row one frame after the published
                              centre crop / zero padding and before /255; jpeg: uint8 (bytes,), the
                              JPEG files of the rows one after another
    shards/shard-NNNNNN.json  the videos of the shard: path, size, mtime_ns, num_frames, fps,
                              listed_frames, the file frame indices stored and their first row
                              (jpeg: the byte offset of every row); the frame set the build stored
                              ("frames": all or eval, and "max_frames")

A shard's ``.json`` is written after its ``.npy`` (each under a temporary name, then renamed), so a
shard without its ``.json`` is an interrupted write and is not read. A video is found by its real path;
when its size or modification time differs from the cached ones, or a sampled frame is not in the cache
(an evaluation-frames cache used for training), the clip is read from the file instead. A dataset checks
at start-up that the cache holds the frames of at least one of its clips (:meth:`FrameCache.why_it_does_not_fit`)
and warns in one line naming the setting that differs when it holds them for none; its samples carry a
``frame_cache_hit`` flag, which :class:`FrameCacheUse` counts over an epoch across loader workers.

The raw cache gives the model the same input, bit for bit, as decoding the file: the crop and padding of
``dataloaders.video.normalize_frames`` run on uint8 frames, so the cache stores exactly the uint8 pixels
that the float conversion starts from.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .video import clip_frame_span, sample_eval_indices

logger = logging.getLogger(__name__)

FORMAT = "dgl-frame-cache/1"
MANIFEST = "frame_cache.json"
SHARD_DIR = "shards"
ENCODINGS = ("raw", "jpeg")
FRAME_SETS = ("all", "eval")


class FrameCacheError(ValueError):
    """A folder is not a usable frame cache for this run; the message names the folder and the reason."""


def shard_paths(directory: str, number: int) -> tuple[str, str]:
    """(frames .npy, entries .json) of shard ``number``."""
    stem = os.path.join(directory, SHARD_DIR, f"shard-{number:06d}")
    return stem + ".npy", stem + ".json"


def file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns): what tells a cached video from a changed one."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def video_key(path: str) -> str:
    return os.path.realpath(path)


def needed_frames(frames: str, num_frames: int, fps: float, start: Optional[float], end: Optional[float],
                  max_frames: int, listed_frames: int = 0) -> list[int]:
    """The file frame indices the loader can ask for: every frame of the clip ("all", training) or the
    evaluation frames ("eval"), sorted."""
    first, count = clip_frame_span(num_frames, fps, start, end, listed_frames)
    if frames == "all":
        return list(range(first, first + count))
    return sorted({first + i for i in sample_eval_indices(count, max_frames)})


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        what = "a file, not a folder" if os.path.exists(directory) else "no such folder"
        raise FrameCacheError(f"frame cache {directory}: {what} (build it with python -m preprocess.frame_cache)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FrameCacheError(f"frame cache {directory}: no {MANIFEST} (not a frame cache; build it with "
                              f"python -m preprocess.frame_cache)") from None
    except (OSError, ValueError) as exc:
        raise FrameCacheError(f"frame cache {path}: unreadable ({type(exc).__name__})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FrameCacheError(f"frame cache {path}: not a {FORMAT} manifest")
    return manifest


@dataclass(frozen=True)
class CachedVideo:
    shard: int
    size: int
    mtime_ns: int
    num_frames: int
    fps: float
    listed_frames: int
    frames: np.ndarray  # int64, sorted file frame indices stored
    row: int  # first row of the shard


def complete_shards(directory: str) -> list[int]:
    """Numbers of the shards whose entries file exists (written last), ascending."""
    numbers = []
    for path in glob.glob(os.path.join(directory, SHARD_DIR, "shard-*.json")):
        try:
            numbers.append(int(os.path.basename(path)[len("shard-"):-len(".json")]))
        except ValueError:
            continue
    return sorted(numbers)


def read_shard_entries(directory: str, number: int) -> dict:
    with open(shard_paths(directory, number)[1]) as f:
        return json.load(f)


class FrameCache:
    """A frame cache opened for reading. ``read(path, plan)`` serves a clip or returns None (read the file).

    Picklable: each DataLoader worker maps the shards itself, on first use.
    """

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.manifest = read_manifest(self.directory)
        self.size = int(self.manifest["size"])
        self.decoder = str(self.manifest["decoder"])
        self.encoding = str(self.manifest.get("encoding", "raw"))
        if self.encoding not in ENCODINGS:
            raise FrameCacheError(f"frame cache {self.directory}: unknown encoding {self.encoding!r}")
        self.videos: dict[str, list[CachedVideo]] = {}  # newest entry first
        self.offsets: dict[int, np.ndarray] = {}  # jpeg: byte offsets of each shard's rows
        self.frame_sets: set = set()  # (frames, max_frames) of the builds that wrote the shards
        for number in complete_shards(self.directory):
            try:
                data = read_shard_entries(self.directory, number)
            except (OSError, ValueError) as exc:
                raise FrameCacheError(f"frame cache {shard_paths(self.directory, number)[1]}: unreadable "
                                      f"({type(exc).__name__}); rebuild it with python -m preprocess.frame_cache")
            for e in data["entries"]:
                video = CachedVideo(number, int(e["size"]), int(e["mtime_ns"]), int(e["num_frames"]),
                                    float(e["fps"]), int(e.get("listed_frames", 0)),
                                    np.asarray(e["frames"], dtype=np.int64), int(e["row"]))
                self.videos.setdefault(e["path"], []).insert(0, video)
            if self.encoding == "jpeg":
                self.offsets[number] = np.asarray(data["offsets"], dtype=np.int64)
            self.frame_sets.add((data.get("frames"), data.get("max_frames")))  # (None, None): not recorded
        self._maps: dict[int, np.ndarray] = {}
        self._warned: set = set()
        self.hits = self.misses = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self.videos)

    def check_run(self, size: int, decoder: str, resize_short_side: bool = False, flag: str = "--frame_cache") -> None:
        """Refuse a cache built for another input size or decoder, or a run that resizes frames."""
        where = f"{flag} {self.directory}"
        if resize_short_side:
            raise FrameCacheError(f"{where}: the cache holds frames cropped without resizing; it cannot be used "
                                  f"with --resize_short_side 1")
        if size != self.size:
            raise FrameCacheError(f"{where}: built for {self.size} px frames but the model takes {size} px "
                                  f"(the CLIP's input resolution); build it with --size {size}")
        if decoder != self.decoder:
            raise FrameCacheError(f"{where}: built from {self.decoder} decoding but this run decodes with "
                                  f"{decoder} (--video_decoder); their pixels may differ")

    def why_it_does_not_fit(self, clips, train: bool, max_frames: int, what: str) -> Optional[str]:
        """None when the cache holds every frame a run could ask for of at least one of ``clips`` ((path,
        start, end) of a dataset: training samples random frames of a clip, evaluation its ``max_frames``
        segment centres); else why it holds them for none (the clips are then read from their files, but
        for training samples that happen to fall on cached frames), naming the setting that differs. Reads
        the entries and stats the files, decodes nothing."""
        frames = "all" if train else "eval"
        listed = unchanged = 0
        for path, start, end in clips:
            found = self.videos.get(video_key(path))
            if not found:
                continue
            listed += 1
            try:
                stamp = file_stamp(path)
            except OSError:
                continue
            for video in found:
                if (video.size, video.mtime_ns) != stamp:
                    continue
                unchanged += 1
                try:
                    wanted = needed_frames(frames, video.num_frames, video.fps, start, end, max_frames,
                                           video.listed_frames)
                except ValueError:
                    return None  # reading the file gives the error, naming it
                if np.isin(wanted, video.frames).all():
                    return None
        where = (f"--frame_cache {self.directory} does not fit {what}, so its {len(clips)} clips are read from their "
                 f"files")
        if not clips:
            return None
        if not listed:
            return (f"{where}: none of their files is in the cache (e.g. {clips[0][0]}); it was built from "
                    f"other files")
        if not unchanged:
            return f"{where}: their files changed since they were cached; build it again"
        sets = {f for f, _ in self.frame_sets}
        if train and sets == {"eval"}:
            return (f"{where}: it holds evaluation frames only (built with --frames eval) and training samples "
                    f"random frames; build it with --frames all")
        evaluation = sorted(m for f, m in self.frame_sets if f == "eval")
        if not train and sets == {"eval"} and max_frames not in evaluation:
            return (f"{where}: it holds the evaluation frames of --max_frames {', '.join(map(str, evaluation))} and "
                    f"this run takes --max_frames {max_frames}; build it with --max_frames {max_frames} "
                    f"(or --frames all)")
        return (f"{where}: it lacks the frames this run samples (built for other clip spans or frames); build it "
                f"with --frames all for the run's videos")

    def _shard(self, number: int) -> np.ndarray:
        m = self._maps.get(number)
        if m is None:
            m = self._maps[number] = np.load(shard_paths(self.directory, number)[0], mmap_mode="r")
        return m

    def entries(self, path: str) -> list:
        """The cached entries of ``path`` (newest first) if the file is unchanged since (size, mtime)."""
        found = self.videos.get(video_key(path))
        if not found:
            return []
        try:
            stamp = file_stamp(path)
        except OSError:
            return []
        same = [video for video in found if (video.size, video.mtime_ns) == stamp]
        if not same and path not in self._warned:
            self._warned.add(path)
            logger.warning("frame cache: %s changed since it was cached (size or modification time); "
                           "it is read from the file", path)
        return same

    def entry(self, path: str) -> Optional[CachedVideo]:
        """The newest cached entry of ``path`` if the file is unchanged, else None."""
        same = self.entries(path)
        return same[0] if same else None

    def frames(self, video: CachedVideo, wanted: list) -> Optional[torch.Tensor]:
        """uint8 (len(wanted), size, size, 3), or None when a wanted frame is not stored."""
        rows = np.searchsorted(video.frames, wanted)
        if np.any(rows >= len(video.frames)) or np.any(video.frames[np.minimum(rows, len(video.frames) - 1)]
                                                       != wanted):
            return None
        rows = rows + video.row
        shard = self._shard(video.shard)
        if self.encoding == "raw":
            return torch.from_numpy(np.asarray(shard[rows]))
        from PIL import Image  # only the jpeg encoding needs it

        offsets = self.offsets[video.shard]
        out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        for k, r in enumerate(rows):
            with Image.open(io.BytesIO(shard[offsets[r]:offsets[r + 1]].tobytes())) as img:
                out[k] = np.asarray(img.convert("RGB"))
        return torch.from_numpy(out)

    def read(self, path: str, plan) -> Optional[tuple]:
        """``(decoded, wanted, order, num_valid, num_frames, fps)`` as ``dataloaders.video.decode_planned``
        returns them, from the cache; None when the file changed or a planned frame is not cached."""
        for video in self.entries(path):
            try:
                order, num_valid = plan(video.num_frames, video.fps, listed_frames=video.listed_frames)
            except ValueError:
                break  # the file's own reading gives the error, naming it
            wanted = sorted(set(order))
            decoded = self.frames(video, wanted)
            if decoded is not None:
                self.hits += 1
                return decoded, wanted, order, num_valid, video.num_frames, video.fps
        self.misses += 1
        return None


def open_frame_cache(directory: Optional[str], size: int, decoder: str,
                     resize_short_side: bool = False) -> Optional[FrameCache]:
    """The cache of ``--frame_cache`` checked against the run (None without one); FrameCacheError
    (a ValueError with one line) when it cannot serve this run."""
    if not directory:
        return None
    try:
        cache = FrameCache(directory)
    except FrameCacheError as exc:
        raise FrameCacheError(f"--frame_cache: {exc}") from None
    cache.check_run(size, decoder, resize_short_side)
    logger.info("frame cache %s: %d video(s), %s, %d px (%s decoding)", directory, len(cache), cache.encoding,
                cache.size, cache.decoder)
    return cache


class FrameCacheUse:
    """Clips served by the frame cache and clips read from their files over one pass (an epoch, an
    evaluation), counted from the ``frame_cache_hit`` flag of each sample: the flags come back with the
    batches from every loader worker process, so the count is the whole pass's (sum it over processes)."""

    def __init__(self):
        self.hits = self.misses = 0

    def update(self, batch: dict) -> None:
        flags = batch.get("frame_cache_hit") if isinstance(batch, dict) else None
        if flags is None:
            return
        flags = torch.as_tensor(flags).bool()
        self.hits += int(flags.sum())
        self.misses += int((~flags).sum())

    def counts(self) -> Optional[dict]:
        """dict(hits, misses), or None when no sample carried the flag (no frame cache)."""
        return {"hits": self.hits, "misses": self.misses} if self.hits + self.misses else None


def describe_use(counts: Optional[dict], what: str) -> Optional[tuple[int, str]]:
    """(logging level, one line) for the frame cache counts of ``what`` (None without a cache): a warning
    when the cache served none of the clips."""
    if not counts:
        return None
    hits, misses = counts["hits"], counts["misses"]
    line = f"frame cache, {what}: {hits} of {hits + misses} clips from the cache, {misses} read from their files"
    if hits == 0:
        return logging.WARNING, line + " (the cache served nothing: see the warning at start-up)"
    return logging.INFO, line
