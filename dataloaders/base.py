"""Shared logic of the video-text datasets.

A dataset subclass only parses its annotation files into :class:`Annotations` (videos, captions, the
video of each caption); this module does the rest: option checks, video file lookup, tokenising,
decoding with the DGL sampling, skip-and-replace of bad videos, and the evaluation views.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from modules.dgl import DGLConfig

from .frame_cache import open_frame_cache
from .video import FRAME_ORDERS, VideoDecodeError, load_video, video_options

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".3gp", ".mpg", ".mpeg", ".flv", ".wmv")


class AnnotationError(ValueError):
    """An annotation file is missing, malformed, or names ids that are not known."""


class BadVideoError(RuntimeError):
    """A video of the dataset cannot be read; the message names the file and the dataset row."""


@dataclass(frozen=True)
class VideoEntry:
    video_id: str
    path: str
    source: str  # where the video is listed, e.g. "MSRVTT_train.9k.csv line 12"
    start: Optional[float] = None  # seconds; None = whole video
    end: Optional[float] = None


@dataclass
class Annotations:
    videos: list[VideoEntry]
    captions: list[str]
    caption_video: list[int]  # index into videos of each caption
    caption_sources: list[str] = field(default_factory=list)


def read_text(path: str, what: str = "annotation file") -> str:
    """The text of a UTF-8 file; a file in another encoding is an :class:`AnnotationError` naming the line."""
    with open(require_file(path, what), "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise AnnotationError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                              f"{exc.start}); save the file as UTF-8") from exc


def read_lines(path: str) -> list[str]:
    """Non-empty stripped lines of a text file (an id list)."""
    lines = [line.strip() for line in read_text(path).split("\n") if line.strip()]
    if not lines:
        raise AnnotationError(f"{path}: the file is empty (no video ids)")
    return lines


def require_file(path: str, what: str = "annotation file") -> str:
    if not os.path.isfile(path):
        raise AnnotationError(f"{what} not found: {path}")
    return path


def index_video_files(root: str) -> dict[str, str]:
    """Map each video file under ``root`` to its path by file name and by name without extension."""
    found: dict[str, str] = {}
    if not root or not os.path.isdir(root):
        return found
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in VIDEO_EXTENSIONS or name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            found.setdefault(name, full)
            found.setdefault(stem, full)
    return found


def get_option(args, name: str, default):
    value = getattr(args, name, None)
    return default if value is None else value


class VideoTextDataset(Dataset):
    """Base class: a list of videos, a list of captions, and the video of each caption.

    Train samples are (caption, video) pairs (``caption_pairs``) or, when a subclass sets
    ``sample_per_video``, one item per video with a random caption of it drawn at every access.
    Test datasets also expose :meth:`text_dataset` and :meth:`video_dataset` so that evaluation
    encodes every caption and every video exactly once.
    """

    name = "base"
    default_video_ext = ".mp4"

    def __init__(self, args, tokenizer, split: str, eval_sampling: bool = False):
        self.split = split
        self.train = split == "train"
        # Frame sampling: random offsets for training; segment centres for evaluation, also for the
        # training split when it is evaluated (the QB-norm query bank).
        self.random_sampling = self.train and not eval_sampling
        self.tokenizer = tokenizer
        self.data_path = get_option(args, "data_path", "")
        self.features_path = get_option(args, "features_path", "")
        self.max_words = int(get_option(args, "max_words", 32))
        self.max_frames = int(get_option(args, "max_frames", 12))
        self.image_resolution = int(get_option(args, "image_resolution", 224))
        self.skip_bad_videos = bool(get_option(args, "skip_bad_videos", False))
        self.video_options = video_options(args)  # --resize_short_side, --video_decoder
        # --frame_cache: decoded, cropped frames read from memory-mapped shards where the cache holds them
        self.video_options["frame_cache"] = open_frame_cache(
            get_option(args, "frame_cache", None), self.image_resolution, self.video_options["decoder"],
            self.video_options["resize_short_side"])
        # accepted for compatibility: the published DGL decoder samples segments of the whole clip and
        # ignores both (videos are pre-encoded at 3 fps).
        self.feature_framerate = float(get_option(args, "feature_framerate", 1.0))
        self.slice_framepos = int(get_option(args, "slice_framepos", 2))
        order_flag = "train_frame_order" if self.random_sampling else "eval_frame_order"
        self.frame_order = int(get_option(args, order_flag, 0))
        if self.frame_order not in FRAME_ORDERS:
            raise ValueError(f"--{order_flag} must be 0 (normal), 1 (reverse) or 2 (random), got {self.frame_order}")
        if self.slice_framepos not in (0, 1, 2):
            raise ValueError(f"--slice_framepos must be 0, 1 or 2, got {self.slice_framepos}")
        # the model's check of the two (a loader reads what the model takes)
        DGLConfig.check({"max_words": self.max_words, "max_frames": self.max_frames}, spell=lambda name: "--" + name)
        self.args = args
        self._file_index: Optional[dict[str, str]] = None

        ann = self.load_annotations()
        self._check_annotations(ann)
        self.videos = ann.videos
        self.captions = ann.captions
        self.caption_sources = ann.caption_sources or [self.videos[v].source for v in ann.caption_video]
        self._index_captions(ann.caption_video)
        logger.info("%s %s: %d videos, %d captions", self.name, split, self.num_videos, self.num_captions)
        self._check_frame_cache()

    def _check_frame_cache(self) -> None:
        """Warn (one line) when --frame_cache holds the frames of none of this split's clips (built for
        other files, frames or --max_frames): the run then reads the videos from their files."""
        cache = self.video_options["frame_cache"]
        if cache is None:
            return
        why = cache.why_it_does_not_fit([(v.path, v.start, v.end) for v in self.videos], self.random_sampling,
                                       self.max_frames, f"the {self.name} {self.split} split" +
                                       (" (training)" if self.random_sampling else " (evaluation frames)"))
        if why:
            logger.warning("%s", why)

    def _cached(self, before: int) -> bool:
        """Whether the clip just loaded came from the frame cache (its hits grew past ``before``)."""
        cache = self.video_options["frame_cache"]
        return cache is not None and cache.hits > before

    def _cache_hits(self) -> int:
        cache = self.video_options["frame_cache"]
        return cache.hits if cache is not None else 0

    # ----------------------------------------------------------------- subclass interface
    sample_per_video = False

    def load_annotations(self) -> Annotations:
        raise NotImplementedError

    # ----------------------------------------------------------------- helpers for subclasses
    def video_path(self, video_id: str, *candidates: str) -> str:
        """Path of ``video_id``: the first existing candidate, else a file named after the id
        (or a candidate) anywhere under ``features_path``, else the first candidate / the default."""
        for c in candidates:
            if os.path.isfile(c):
                return c
        if self._file_index is None:
            self._file_index = index_video_files(self.features_path)
        stem = os.path.splitext(video_id)[0]
        for key in (video_id, *(os.path.basename(c) for c in candidates), stem):
            if key in self._file_index:
                return self._file_index[key]
        if candidates:
            return candidates[0]
        return os.path.join(self.features_path, video_id + self.default_video_ext)

    def _check_annotations(self, ann: Annotations) -> None:
        if not ann.videos:
            raise AnnotationError(f"{self.name} {self.split}: the annotation files list no videos "
                                  f"(--data_path {self.data_path})")
        if len(ann.captions) != len(ann.caption_video):
            raise AnnotationError(f"{self.name} {self.split}: {len(ann.captions)} captions but "
                                  f"{len(ann.caption_video)} caption->video links")
        bad = [i for i, v in enumerate(ann.caption_video) if not 0 <= v < len(ann.videos)]
        if bad:
            raise AnnotationError(f"{self.name} {self.split}: caption {bad[0]} points to no video")
        sources = ann.caption_sources or [ann.videos[v].source for v in ann.caption_video]
        for c, text in enumerate(ann.captions):
            if not isinstance(text, str) or not text.strip():
                video = ann.videos[ann.caption_video[c]].video_id
                raise AnnotationError(f"{sources[c]}: empty caption (video {video})")
        no_caption = set(range(len(ann.videos))) - set(ann.caption_video)
        if no_caption:
            v = ann.videos[min(no_caption)]
            raise AnnotationError(f"{self.name} {self.split}: {len(no_caption)} videos have no caption "
                                  f"(e.g. {v.video_id}, listed in {v.source})")

    def _index_captions(self, caption_video: Sequence[int]) -> None:
        self.caption_video_index = torch.as_tensor(list(caption_video), dtype=torch.long)
        self._captions_of_video: list[list[int]] = [[] for _ in self.videos]
        for c, v in enumerate(caption_video):
            self._captions_of_video[v].append(c)

    def leave_out_videos(self, indices: Iterable[int]) -> int:
        """Remove these videos and their captions (bad videos with ``--skip_bad_videos``); returns the
        number of captions removed. Nothing is ever put in their place."""
        drop = set(int(i) for i in indices)
        if not drop:
            return 0
        new_index = {}
        for old, _ in enumerate(self.videos):
            if old not in drop:
                new_index[old] = len(new_index)
        keep_captions = [c for c, v in enumerate(self.caption_video_index.tolist()) if v in new_index]
        removed = self.num_captions - len(keep_captions)
        links = [new_index[int(self.caption_video_index[c])] for c in keep_captions]
        self.captions = [self.captions[c] for c in keep_captions]
        self.caption_sources = [self.caption_sources[c] for c in keep_captions]
        self.videos = [v for i, v in enumerate(self.videos) if i not in drop]
        self._index_captions(links)
        return removed

    # ----------------------------------------------------------------- sizes
    @property
    def num_videos(self) -> int:
        return len(self.videos)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def multi_sentence_per_video(self) -> bool:
        return self.num_captions != self.num_videos

    def __len__(self) -> int:
        return self.num_videos if self.sample_per_video else self.num_captions

    # ----------------------------------------------------------------- text and video
    def encode_text(self, text: str) -> torch.Tensor:
        from modules.tokenizer import tokenize

        return tokenize([text], max_words=self.max_words, tokenizer=self.tokenizer)[0]

    def load_video(self, video_index: int, row: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one video; on failure raise :class:`BadVideoError` naming the file and the row."""
        entry = self.videos[video_index]
        try:
            video, mask, _ = load_video(entry.path, self.max_frames, self.image_resolution,
                                        train=self.random_sampling, start=entry.start, end=entry.end,
                                        frame_order=self.frame_order, **self.video_options)
            return video, mask
        except VideoDecodeError as exc:
            raise BadVideoError(f"{self.name} {self.split} {row}: video '{entry.video_id}' "
                                f"(listed in {entry.source}): {exc}") from exc

    def load_video_or_replace(self, video_index: int, row: str) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
        """``load_video``; with ``skip_bad_videos`` a failing video is logged and replaced by the next
        readable one. Returns ``(video, mask, replaced, index_used)``."""
        try:
            video, mask = self.load_video(video_index, row)
            return video, mask, False, video_index
        except BadVideoError as exc:
            if not self.skip_bad_videos:
                raise
            logger.warning("skipping bad video, a replacement is used: %s", exc)
            first_error = exc
        for step in range(1, self.num_videos):
            other = (video_index + step) % self.num_videos
            try:
                video, mask = self.load_video(other, f"replacement for {row}")
                return video, mask, True, other
            except BadVideoError as exc:
                logger.warning("skipping bad video: %s", exc)
        raise BadVideoError(f"no readable video left in {self.name} {self.split}; first error: {first_error}")

    # ----------------------------------------------------------------- samples
    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.sample_per_video:
            caption_index, video_index = None, index
            row = f"item {index}"
        else:
            caption_index, video_index = index, int(self.caption_video_index[index])
            row = f"item {index} (caption in {self.caption_sources[index]})"
        hits = self._cache_hits()
        video, mask, replaced, used = self.load_video_or_replace(video_index, row)
        if caption_index is None or replaced:
            # one random caption of the video; after a replacement, of the replacement (pairs stay matched)
            options = self._captions_of_video[used]
            caption_index = options[int(torch.randint(len(options), (1,)))]
        item = {
            "input_ids": self.encode_text(self.captions[caption_index]),
            "video": video,
            "video_mask": mask,
            "index": index,
            "replaced": replaced,
        }
        if self.video_options["frame_cache"] is not None:  # counted per epoch across workers (FrameCacheUse)
            item["frame_cache_hit"] = self._cached(hits)
        return item

    def text_dataset(self) -> "TextView":
        return TextView(self)

    def video_dataset(self) -> "VideoView":
        return VideoView(self)


class _EachOnce(Dataset):
    """Every caption (:class:`TextView`) or every video (:class:`VideoView`) of a dataset once, by index."""

    def __init__(self, parent: VideoTextDataset):
        self.parent = parent

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.item(index)


class TextView(_EachOnce):
    """Every caption once: dict(input_ids, caption_index)."""

    def __len__(self) -> int:
        return self.parent.num_captions

    def item(self, index: int) -> dict:
        return {"input_ids": self.parent.encode_text(self.parent.captions[index]), "caption_index": index}


class VideoView(_EachOnce):
    """Every video once: dict(video, video_mask, video_index, replaced, unreadable).

    A test video is never replaced by another: one that cannot be decoded raises :class:`BadVideoError`,
    or with ``skip_bad_videos`` comes back flagged ``unreadable`` (zero pixels) so that the evaluation
    leaves it and its captions out.
    """

    def __len__(self) -> int:
        return self.parent.num_videos

    def item(self, index: int) -> dict:
        parent = self.parent
        row = f"video {index}"
        hits = parent._cache_hits()
        try:
            video, mask = parent.load_video(index, row)
            unreadable = False
        except BadVideoError as exc:
            if not parent.skip_bad_videos:
                raise
            logger.warning("left out of the evaluation: %s", exc)
            size = parent.image_resolution
            video = torch.zeros(parent.max_frames, 3, size, size)
            mask = torch.ones(parent.max_frames, dtype=torch.long)
            unreadable = True
        item = {"video": video, "video_mask": mask, "video_index": index, "replaced": False,
                "unreadable": unreadable}
        if parent.video_options["frame_cache"] is not None:
            item["frame_cache_hit"] = parent._cached(hits)
        return item


class ReplacementCounter:
    """Training samples whose video was replaced (``skip_bad_videos``: it failed to decode and the next
    readable video took its place) over one epoch, counted from each sample's ``replaced`` flag: the flags
    come back with the batches from every loader worker process, so the count is the whole epoch's (sum it
    over processes). The training loop's one count of them (``training.step``)."""

    def __init__(self):
        self.replaced = self.seen = 0

    def update(self, batch: dict) -> None:
        flags = batch.get("replaced") if isinstance(batch, dict) else None
        if flags is None:
            return
        flags = torch.as_tensor(flags)
        self.replaced += int(flags.sum())
        self.seen += int(flags.numel())


def describe_replacements(replaced: int, seen: int, what: str) -> Optional[tuple[int, str]]:
    """(logging level, one line) for ``replaced`` of ``seen`` training samples of ``what`` (an epoch); a
    warning when any was replaced (the warnings logged as it happened name the files); None when no sample
    carried the flag."""
    if not seen:
        return None
    line = f"{what}: {replaced} of {seen} training samples had an unreadable video and were replaced"
    return (logging.WARNING if replaced else logging.INFO), line


def require_columns(path: str, header: Sequence[str], needed: Sequence[str]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {missing}; found columns {list(header)}")
