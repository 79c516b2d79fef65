"""A searchable index of video features, kept on disk in atomic shards.

Index folder::

    index.json              format, the model record (fingerprint, DGL/CLIP configuration, files),
                            the video transform ("sampling": max_frames, resolution, resize_short_side,
                            decoder), the segmentation (retrieval.segments), counts, the shard files
                            readers use ("shards"; written last by a run: its commit)
    shards/shard-NNNNNN.npz features (n, D) float32, L2-normalised, and entries (JSON): path, size,
                            mtime_ns, dev and ino (the file's identity), duration, num_frames, fps,
                            frames_used, start and end (seconds of the range; None for a whole file),
                            segment ([i, n]: range i of the file's n)
    failed.json             the videos (or ranges) the last run could not read, with the reason
    approximate.faiss/.json the approximate search of a large index (retrieval.approximate): faiss
                            codes, and the record of the index content they were built over, the
                            settings and the recall measured against exact search
    ann-<kind>.faiss/.json  cached faiss index of --backend faiss-ivf / faiss-hnsw and its measured recall
    .index.lock             held by the run that writes (retrieval.locks): a second run waits
    .commit.lock            shared by readers, exclusive while a run commits

Every file is written under a temporary name and renamed (``os.replace``), so a killed run leaves
complete shards only and the next run continues after them, range by range. A file is identified by
path, size and modification time: re-indexing drops deleted or changed files and encodes new or
changed ones, and the ranges of a file that a killed run did not reach. A run's new shards and the
shards it drops entries from reach readers together, at its commit. Whatever changes a feature
(the model, the video transform, the segmentation) is recorded; an index is never extended with
features made otherwise.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import re
import stat
import time
from dataclasses import dataclass

import numpy as np
import torch

from retrieval.approximate import APPROXIMATE_FROM, ApproximateSearch, MemoryRows, ShardRows, load_or_build
from retrieval.encode import (TRANSFORM_DEFAULTS, VIDEO_EXTENSIONS, assign_shares, autocast_dtype, encode_batch,
                              file_identity, find_videos, plan_loader, video_loader)
from retrieval.locks import commit_lock, reading, writer_lock
from retrieval.model_io import SearchError, describe_model
from retrieval.segments import NMS_IOU, Segmentation, merge_ranked, suppress_overlaps
from retrieval.search import APPROXIMATE, BACKENDS, FaissSearcher, exact_topk, faiss_available, recall_at_k
from runtime.errors import first_line
from runtime.files import OutputWriteError, atomic_write  # temp file + fsync + os.replace
from runtime.group import Group

FORMAT = "dgl-video-index/2"
OLD_FORMATS = ("dgl-video-index/1",)  # whole files, decord, no resize: read as such
WHOLE = Segmentation(mode="whole")
SHARD_GLOB = "shard-*.npz"
SHARD_NUMBER = re.compile(r"shard-(\d+)\.npz")
TEXT_BATCH = 256  # texts encoded together by VideoIndex.encode_texts


def _write_json(path: str, data) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1) + "\n"), mode="w")


@dataclass
class Shard:
    path: str | None           # None for an in-memory index
    entries: list[dict]
    features: torch.Tensor | None = None  # loaded on demand for on-disk shards

    def load_features(self) -> torch.Tensor:
        if self.features is not None:
            return self.features
        features, entries = read_shard(self.path)
        if entries != self.entries:  # an index run committed after this reader read the entries
            raise SearchError(f"the index shard {self.path} changed while it was being read (an index run "
                              "finished meanwhile): run the command again")
        return features


def write_shard(path: str, features: torch.Tensor, entries: list[dict]) -> None:
    def write(f):
        buf = io.BytesIO()
        np.savez(buf, features=features.numpy().astype(np.float32), entries=np.array(json.dumps(entries)))
        f.write(buf.getvalue())

    atomic_write(path, write)


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def read_shard(path: str, entries_only: bool = False) -> tuple[torch.Tensor | None, list[dict]]:
    """(features, entries) of a shard; SearchError naming the file when it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            entries = json.loads(str(data["entries"]))
            features = None if entries_only else torch.from_numpy(np.array(data["features"], dtype=np.float32))
        if not isinstance(entries, list) or (features is not None and features.shape[0] != len(entries)):
            raise ValueError("features and entries disagree")
    except Exception as err:  # noqa: BLE001 - any damage is the same problem for the user
        if _is_zip(path):
            reason = f"{type(err).__name__}: {first_line(err, empty='')}"
        else:  # numpy's message here advises unpickling the file; say what the file is instead
            reason = "not an .npz archive: damaged or truncated"
        raise SearchError(f"corrupt index shard {path} ({reason}); "
                          "run `search_videos.py index` again to re-encode its videos") from err
    return features, entries


def shard_order(path: str) -> tuple:
    """Shards in the order of their numbers (a run of several processes numbers its shards by their place
    in the run's work, with gaps; numbers may outgrow six digits)."""
    m = SHARD_NUMBER.match(os.path.basename(path))
    return (0, int(m.group(1)), "") if m else (1, 0, os.path.basename(path))


def entry_id(entry: dict) -> str:
    """A stable id of an entry: the same file (path, size, time) and range give the same id."""
    key = f"{entry['path']}|{entry.get('size')}|{entry.get('mtime_ns')}|{entry.get('start')}|{entry.get('end')}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def file_record(path: str) -> dict:
    """What an entry records of its file: path, size, modification time and the file's identity on the
    machine (device and inode), so that the server hands out only the very file that was indexed."""
    st = os.stat(path)
    return {"path": path, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "dev": int(st.st_dev),
            "ino": int(st.st_ino)}


def is_same_file(entry: dict, st: os.stat_result) -> bool:
    """``st`` (of the entry's path, or of a descriptor opened on it) is the file the entry was made from:
    same size and modification time, and same device and inode where the entry records them (entries of
    indexes made before identities were recorded have size and time only)."""
    if (int(st.st_size), int(st.st_mtime_ns)) != (entry.get("size"), entry.get("mtime_ns")):
        return False
    return "ino" not in entry or (int(st.st_dev), int(st.st_ino)) == (entry.get("dev"), entry.get("ino"))


def file_state(entry: dict) -> str:
    """'ok' while the entry's file is the one indexed; 'gone' (deleted) or 'changed' (edited, replaced,
    or no longer a regular file) since."""
    try:
        st = os.stat(entry["path"])
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "changed"
    return "ok" if stat.S_ISREG(st.st_mode) and is_same_file(entry, st) else "changed"


class IndexedFileError(SearchError):
    """The file of an entry is not the one indexed any more; ``state``: 'gone' or 'changed'."""

    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


def open_indexed_file(entry: dict) -> tuple[int, os.stat_result]:
    """An open descriptor of the entry's file and its ``fstat``, only while it is the file that was indexed.

    The identity is checked on the opened descriptor, not on the path, so a file or link swapped in
    between the check and the read is never read. Entries that record the file's device and inode accept
    the same file only; older entries (size and time only) accept a regular file that is not a symbolic
    link. Raises :class:`IndexedFileError`; the caller closes the descriptor."""
    path = entry["path"]
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a FIFO swapped in must not block
    if "ino" not in entry:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise IndexedFileError("gone", f"the file {path} is gone (deleted since it was indexed)") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise IndexedFileError("changed", f"the file {path} is a symbolic link now, not the file that was "
                                              "indexed") from None
        raise IndexedFileError("changed", f"the file {path} cannot be read ({os.strerror(err.errno).lower()})") \
            from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not is_same_file(entry, st):
        os.close(fd)
        raise IndexedFileError("changed", f"the file {path} is not the file that was indexed any more (changed "
                                          "or replaced since): run `search_videos.py index` again")
    return fd, st


def transform_record(max_frames: int, image_resolution: int, resize_short_side: bool = False,
                     decoder: str = "decord", ranges: str = "frames") -> dict:
    """What turns a file into the model's input: recorded in the index, compared on every update.
    ``ranges``: how a range's start and end pick its frames (retrieval.encode.read_for_model)."""
    return {"max_frames": max_frames, "image_resolution": image_resolution, "resize_short_side": bool(resize_short_side),
            "decoder": decoder, "frames": "evaluation sampling (segment centres)", "ranges": ranges}


def recorded_transform(meta: dict) -> dict:
    sampling = dict(meta.get("sampling") or {})
    sampling.setdefault("ranges", "seconds")  # made before frame-accurate ranges: read as it was built
    for key, value in TRANSFORM_DEFAULTS.items():
        sampling.setdefault(key, value)  # indexes of format 1 were made with the defaults
    return sampling


def recorded_segmentation(meta: dict) -> Segmentation:
    seg = meta.get("segmentation")
    return Segmentation(**{"scales": 1, **seg}) if seg else WHOLE  # no scales recorded: one range per shot


def make_index_folder(index_dir: str) -> None:
    """Create the index folder (and its parents); SearchError in one line when that cannot be."""
    if os.path.exists(index_dir) and not os.path.isdir(index_dir):
        raise SearchError(f"--index {index_dir} is a file, not a folder: give a new folder or an index folder")
    try:
        os.makedirs(os.path.join(index_dir, "shards"), exist_ok=True)
    except OSError as err:
        reason = os.strerror(err.errno).lower() if err.errno else str(err)
        raise SearchError(f"cannot create the index folder {index_dir} ({reason})") from None


SEGMENTATION_FLAGS = {"mode": "--segments", "min_len": "--min_len", "max_len": "--max_len", "window": "--window",
                      "stride": "--stride", "whole_up_to": "--whole_up_to", "threshold": "--shot_threshold",
                      "scales": "--scales"}


def _flag_value(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def segmentation_mismatch(index_dir: str, built: Segmentation, asked: Segmentation) -> str:
    """The refusal of a run whose segmentation differs from the index's, naming each setting that differs
    with both values (the two descriptions alone can look alike: a setting the mode does not use, or
    numbers that print the same)."""
    differ = [f"{flag} {_flag_value(getattr(asked, field))} (the index: {_flag_value(getattr(built, field))})"
              for field, flag in SEGMENTATION_FLAGS.items() if getattr(asked, field) != getattr(built, field)]
    return (f"the index {index_dir} was built with {built.describe()}; this run asks for {', '.join(differ)}: "
            "use the index's settings (or leave the flags out) or index into a new folder")


_TRANSFORM_FLAGS = {"max_frames": "--max_frames", "image_resolution": "the CLIP's input size",
                    "resize_short_side": "--resize_short_side", "decoder": "--video_decoder", "ranges": "--ranges"}


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity (of the best segment of the range)
    path: str
    entry: dict  # the best segment's entry
    start: float | None = None  # the range (seconds); None for a whole file
    end: float | None = None
    segments: int = 1  # segments merged into the range
    file: str = "ok"  # file_state of the path when the search ran: ok, gone or changed

    @property
    def id(self) -> str:
        return entry_id(self.entry)

    def to_dict(self) -> dict:
        return {**self.entry, "rank": self.rank, "score": round(self.score, 6), "path": self.path,
                "start": self.start, "end": self.end, "id": self.id, "segments": self.segments, "file": self.file}


class VideoIndex:
    """Video (or video range) features + their manifest, searchable by text, by video or by feature.

    ``VideoIndex.build(model, paths, index_dir=..., tokenizer=...)`` encodes (or updates) an index;
    ``VideoIndex.open(index_dir, model=...)`` opens one, refusing a model other than the one that
    built it; ``index.search(texts, k)`` returns, per text, the top-k :class:`Hit` list (time ranges of
    one video that rank together are merged into one hit).
    """

    def __init__(self, root: str | None, record: dict, shards: list[Shard], failed: list[dict] | None = None,
                 model=None, tokenizer=None):
        self.root, self.record, self.shards = root, record, shards
        self.failed = failed or []
        self._rewrite: set[str] = set()  # shard files to rewrite / remove at the commit
        self._remove: set[str] = set()
        self.model, self.tokenizer = model, tokenizer
        self._created = False  # index.json was written by this run (retrieval.index._open_for_update)
        self._kernels_recorded = False  # the kernels were recorded by an earlier run (_open_locked)
        self.approximate_from = APPROXIMATE_FROM  # entries from which `auto` searches approximately
        self._approximate: ApproximateSearch | None = None

    # ------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return sum(len(s.entries) for s in self.shards)

    @property
    def entries(self) -> list[dict]:
        cached = getattr(self, "_entries", None)
        return cached if cached is not None else [e for s in self.shards for e in s.entries]

    @property
    def fingerprint(self) -> str:
        return self.record["model"]["fingerprint"]

    @property
    def transform(self) -> dict:
        return recorded_transform(self.record)

    @property
    def segmentation(self) -> Segmentation:
        return recorded_segmentation(self.record)

    def features(self) -> torch.Tensor:
        """All features (N, D) in row order (loads every shard)."""
        loaded = [s.load_features() for s in self.shards]
        dim = self.record.get("dim") or 0
        return torch.cat(loaded) if loaded else torch.zeros(0, dim)

    def keep_in_memory(self, features: bool = True) -> "VideoIndex":
        """Read every shard's features once (a server searches many times); ``features=False``: the entries
        only (the approximate search reads the features it needs from the shard files)."""
        for s in self.shards:
            if features:
                s.features = s.load_features()
        self._entries = [e for s in self.shards for e in s.entries]  # a snapshot that no longer changes
        return self

    def entry_rows(self) -> dict[str, int]:
        """{entry id: row}."""
        return {entry_id(e): row for row, e in enumerate(self.entries)}

    # ------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, model, paths, index_dir: str | None = None, tokenizer=None, batch_size: int = 8,
              workers: int = 0, precision: str = "auto", shard_size: int = 256, progress: bool = False,
              model_record: dict | None = None, on_shard=None, log=print, segmentation: Segmentation | None = None,
              resize_short_side: bool | None = None, decoder: str | None = None,
              kernels: dict | None = None, ranges: str | None = None,
              new_index_segmentation: Segmentation | None = None, group: Group | None = None,
              compile_auto=None) -> "VideoIndex":
        """Encode the videos under ``paths`` (files or folders, recursively) with ``model``.

        With ``index_dir`` the index is written there in shards of ``shard_size`` entries and an
        existing index is updated (new and changed files encoded, deleted ones dropped). Unreadable
        videos (or ranges) are skipped and listed in ``index.failed``. ``on_shard(path)`` is called after
        each shard is written. ``segmentation`` (retrieval.segments.Segmentation; default: whole files),
        ``resize_short_side``, ``decoder`` (load_video's options) and ``ranges`` ("frames": range
        boundaries are frames, read to the frame, the default for a new index; "seconds": whole seconds
        read by the datasets' span rule): None takes an existing index's record; a value other than the
        record is refused. ``kernels``: the attention backend and fp32
        product path the entries are computed with, recorded by the first run (later runs read them back,
        so that a resumed or grown index equals one uninterrupted run). ``new_index_segmentation``: the
        segmentation a new index gets when ``segmentation`` is None, decided under the writer lock (a run
        that waited for another may find the index that run created). ``compile_auto``
        (retrieval.auto_compile.AutoCompile): ``--compile auto``, decided once the run has planned its ranges
        (:meth:`_choose_compiled`).

        ``group`` (runtime.group): the processes of a torchrun launch, each calling ``build`` with the same
        arguments; the work is split between them (:meth:`_build_together`). Every process returns the
        index as committed.
        """
        if group is not None and group.distributed:
            if not index_dir:
                raise SearchError("an index built by several processes needs an index folder")
            return cls._build_together(group, model, paths, index_dir, tokenizer, batch_size, workers, precision,
                                       shard_size, progress, model_record, on_shard, log, segmentation,
                                       resize_short_side, decoder, kernels, ranges, new_index_segmentation,
                                       compile_auto)
        files, record, wanted = cls._check_request(model, paths, index_dir, batch_size, shard_size, workers,
                                                   segmentation, model_record, resize_short_side, decoder, ranges)
        if index_dir:
            make_index_folder(index_dir)
        # one run at a time writes into a folder: a second one waits for the first (its entries are read
        # after the first run's commit), so both runs' entries end in the index
        with writer_lock(index_dir, log) if index_dir else contextlib.nullcontext():
            if index_dir:
                index = cls._open_locked(index_dir, record, wanted, segmentation, new_index_segmentation, kernels,
                                         log)
            else:
                sampling = transform_record(**{k: (TRANSFORM_DEFAULTS.get(k) if v is None else v)
                                               for k, v in wanted.items()})
                index = cls(None, {"format": FORMAT, "model": record, "sampling": sampling,
                                   "segmentation": (segmentation or WHOLE).to_dict()}, [])
            index.model, index.tokenizer = model, tokenizer
            todo, have = index._drop_stale(files, log)
            index._encode(todo, have, batch_size, workers, precision, shard_size, progress, on_shard, compile_auto)
            if index_dir:
                index._commit()
        if len(index) == 0:
            first = index.failed[0] if index.failed else {"path": "?", "reason": "?"}
            raise SearchError(f"none of the {len(files)} video files could be read "
                              f"(e.g. {first['path']}: {first['reason']})")
        return index

    @classmethod
    def _build_together(cls, group: Group, model, paths, index_dir: str, tokenizer, batch_size: int, workers: int,
                        precision: str, shard_size: int, progress: bool, model_record, on_shard, log, segmentation,
                        resize_short_side, decoder, kernels, ranges, new_index_segmentation,
                        compile_auto=None) -> "VideoIndex | None":
        """:meth:`build` by the processes of ``group``, each with the same arguments.

        1. Process 0 takes the folder's writer lock (held to the end), opens the index for the update and
           finds what is left to encode (as one process would); the others wait for its answer.
        2. Each process plans every N-th of those files (their ranges and lengths); all of them then hold
           the same list of ranges to encode, in file order, and take their share of it
           (retrieval.encode.assign_shares: contiguous, balanced by seconds of video, in whole batches).
           With ``compile_auto``, process 0 decides from the largest share whether every process compiles.
        3. Each process encodes its share on its device into shards of its own (written atomically,
           numbered by their place in the list).
        4. Once every process has reported its share done, process 0 commits: the manifest lists the kept
           shards and every process's new ones. A process that fails (a full disk) makes every process
           stop with its message and nothing is committed; a killed process leaves the shards it finished
           on disk, and the same command encodes only what no shard holds (with any number of processes).

        Process 0 returns the index; the others None (the manifest on disk is the result).
        """
        lock = contextlib.ExitStack()
        index = None

        def prepare():
            nonlocal index
            files, record, wanted = cls._check_request(model, paths, index_dir, batch_size, shard_size, workers,
                                                       segmentation, model_record, resize_short_side, decoder, ranges)
            make_index_folder(index_dir)
            lock.enter_context(writer_lock(index_dir, log))
            index = cls._open_locked(index_dir, record, wanted, segmentation, new_index_segmentation, kernels, log,
                                     list_shards=True)
            index.model, index.tokenizer = model, tokenizer
            todo, have = index._drop_stale(files, log)
            if todo:
                index._encoding_dtype(precision)
            return {"record": index.record, "files": len(files), "todo": todo,
                    "have": {p: sorted(v) for p, v in have.items()}, "first_number": index._next_shard_number()}

        try:
            plan = _on_main(group, prepare)
            if not group.is_main:
                index = cls(index_dir, plan["record"], [], model=model, tokenizer=tokenizer)
            todo, have = plan["todo"], {p: set(v) for p, v in plan["have"].items()}
            planned = {}
            for part in _everywhere(group, lambda: index._plan_files(todo[group.rank::group.world_size], workers)):
                planned.update(part)
            items, weights, plan_failed = [], [], []
            for path in todo:
                file_plan = planned[path]
                if "error" in file_plan:
                    plan_failed.append({"path": path, "start": None, "end": None, "reason": file_plan["error"]})
                    continue
                done, file_ranges = have.get(path, set()), file_plan["ranges"]
                for i, ((a, b), w) in enumerate(zip(file_ranges, file_plan["weights"])):
                    if i not in done:
                        items.append((path, a, b, i, len(file_ranges)))
                        weights.append(w)
            shares = assign_shares(weights, batch_size, group.world_size)
            lo, hi = shares[group.rank]
            compiling = False
            if compile_auto is not None:
                largest = max(end - start for start, end in shares)
                compiling = _on_main(group, lambda: index._choose_compiled(compile_auto, largest, group.world_size))
            dtype = autocast_dtype(precision, next(model.parameters()).device)
            kept = len(index.shards)

            def encode():
                if compiling:  # here, so that a process that fails to compile stops every process
                    compile_auto.compile()
                index.failed = []
                index._encode_items(items[lo:hi], batch_size, workers, dtype, shard_size, progress, on_shard,
                                    first_number=plan["first_number"], position=lo)
                return {"shards": [os.path.basename(s.path) for s in index.shards[kept:]], "failed": index.failed}

            shares = _everywhere(group, encode, after="nothing was committed: the index is as it was (the shards "
                                                      "finished so far are kept; the same command continues)")

            def commit():  # every share is done (the gather above waited for all of them)
                del index.shards[kept:]
                for share in shares:
                    for name in share["shards"]:
                        path = os.path.join(index_dir, "shards", name)
                        if not os.path.isfile(path):
                            raise SearchError(f"the shard {path} another process wrote is not in {index_dir} here: "
                                              "the index folder must be on a file system every machine shares")
                        index.shards.append(Shard(path, read_shard(path, entries_only=True)[1]))
                index.failed = plan_failed + [f for share in shares for f in share["failed"]]
                index._commit()
                return len(index)

            entries = _on_main(group, commit)
        finally:
            lock.close()
        if entries == 0:
            failed = plan_failed + [f for share in shares for f in share["failed"]]
            first = failed[0] if failed else {"path": "?", "reason": "?"}
            raise SearchError(f"none of the {plan['files']} video files could be read "
                              f"(e.g. {first['path']}: {first['reason']})")
        return index if group.is_main else None

    @classmethod
    def _check_request(cls, model, paths, index_dir, batch_size, shard_size, workers, segmentation, model_record,
                       resize_short_side, decoder, ranges) -> tuple[list[str], dict, dict]:
        """(the video files under ``paths``, the model record, the transform asked for); SearchError when
        the request cannot be done."""
        if batch_size < 1 or shard_size < 1 or workers < 0:
            raise SearchError(f"batch_size and shard_size must be >= 1 and workers >= 0 "
                              f"(got {batch_size}, {shard_size}, {workers})")
        if segmentation is not None:
            try:
                segmentation.check()
            except ValueError as err:
                raise SearchError(str(err)) from err
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise SearchError(f"no such file or folder: {missing[0]}")
        files = find_videos(paths, exclude=index_dir)
        if not files:
            raise SearchError(f"no video files ({' '.join(VIDEO_EXTENSIONS[:5])} ...) found under "
                              f"{', '.join(map(str, paths))}")
        record = model_record or describe_model(model)
        wanted = {"max_frames": model.config.max_frames, "image_resolution": model.image_resolution,
                  "resize_short_side": resize_short_side, "decoder": decoder, "ranges": ranges}
        return files, record, wanted

    @classmethod
    def _open_locked(cls, index_dir, record, wanted, segmentation, new_index_segmentation, kernels, log,
                     list_shards: bool = False) -> "VideoIndex":
        """The index folder opened for an update by the run holding its writer lock (created when new).
        ``list_shards``: a new index's manifest lists no shard until the run's commit (else readers of a new
        index see every shard file, as it is written)."""
        if segmentation is None and not os.path.isfile(os.path.join(index_dir, "index.json")):
            segmentation = new_index_segmentation
        on_disk = (cls._read_meta(index_dir).get("kernels")
                   if os.path.isfile(os.path.join(index_dir, "index.json")) else None)
        recorded = on_disk if kernels is not None else None
        if recorded and recorded.get("device") == kernels.get("device") and recorded != kernels:
            raise SearchError(f"{index_dir} records other kernels ({recorded}) than this run computes with "
                              f"({kernels}): another index run created it while this one waited; run "
                              "the same command again (it then computes with the recorded ones)")
        index = cls._open_for_update(index_dir, record, wanted, segmentation, log, kernels, list_shards)
        index._kernels_recorded = bool(on_disk and (kernels is None or on_disk.get("device") == kernels.get("device")))
        if kernels is not None and index.record.get("kernels", {}).get("device") != kernels.get("device"):
            index.record["kernels"] = dict(kernels)  # an index from before kernels were recorded: saved at the end
        return index

    @classmethod
    def _open_for_update(cls, index_dir: str, record: dict, wanted: dict, segmentation: Segmentation | None,
                         log, kernels: dict | None = None, list_shards: bool = False) -> "VideoIndex":
        os.makedirs(os.path.join(index_dir, "shards"), exist_ok=True)
        meta_path = os.path.join(index_dir, "index.json")
        created = False  # index.json written by this run, before any shard
        if os.path.exists(meta_path):
            meta = cls._read_meta(index_dir)
            if meta["model"]["fingerprint"] != record["fingerprint"]:
                raise SearchError(_other_model_message(index_dir, meta["model"], record))
            built = recorded_transform(meta)
            for key, flag in _TRANSFORM_FLAGS.items():
                if wanted[key] is not None and wanted[key] != built.get(key):
                    raise SearchError(f"the index {index_dir} was built with {flag} {built.get(key)!r}, this run asks "
                                      f"for {wanted[key]!r}: its features would not be comparable; use the same "
                                      "setting or index into a new folder")
            seg = recorded_segmentation(meta)
            if segmentation is not None and segmentation != seg:
                raise SearchError(segmentation_mismatch(index_dir, seg, segmentation))
            if meta.get("format") != FORMAT:  # format 1: record what it was made with, in this format
                meta.update(format=FORMAT, sampling=transform_record(**{k: built[k] for k in _TRANSFORM_FLAGS}),
                            segmentation=seg.to_dict())
        else:
            if glob.glob(os.path.join(index_dir, "shards", SHARD_GLOB)):
                raise SearchError(f"{index_dir} has shards but no index.json; use an empty folder")
            sampling = transform_record(**{k: (TRANSFORM_DEFAULTS.get(k) if v is None else v) for k, v in wanted.items()})
            meta = {"format": FORMAT, "model": record, "sampling": sampling,
                    "segmentation": (segmentation or WHOLE).to_dict(), "created": time.time()}
            if kernels is not None:  # recorded before the first shard, so a killed first run keeps them too
                meta["kernels"] = dict(kernels)
            if list_shards:
                meta["shards"] = []
            _write_json(meta_path, meta)
            created = True
        for pattern in (".*.tmp", os.path.join("shards", ".*.tmp")):  # left by a killed run
            for tmp in glob.glob(os.path.join(index_dir, pattern)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        shards = []
        for path in sorted(glob.glob(os.path.join(index_dir, "shards", SHARD_GLOB)), key=shard_order):
            try:  # read whole (not only the entries): a damaged shard is found and re-encoded here
                _, entries = read_shard(path)
            except SearchError as err:
                os.replace(path, path + ".corrupt")
                if log:
                    log(f"warning: {err}; moved to {path}.corrupt and its videos are encoded again")
                continue
            shards.append(Shard(path, entries))
        index = cls(index_dir, meta, shards)
        index._created = created
        return index

    def _drop_stale(self, files: list[str], log) -> tuple[list[str], dict[str, set]]:
        """Drop entries of deleted or changed files (rewriting their shards); return the files to encode
        and, for files a killed run left incomplete, the range numbers already indexed.

        Entries of files outside the folders given this time stay while their file is unchanged, so
        indexing another folder into the same index adds to it.
        """
        current = {}
        for path in files:
            try:
                current[path] = os.stat(path)
            except OSError:
                continue

        def unchanged(entry: dict) -> bool:
            st = current.get(entry["path"])
            if st is None:
                try:
                    st = current[entry["path"]] = os.stat(entry["path"])
                except OSError:  # deleted
                    return False
            return is_same_file(entry, st)

        seen, dropped = set(), 0
        for shard in list(self.shards):
            keep = []
            for i, e in enumerate(shard.entries):
                key = (e["path"], tuple(e.get("segment") or (0, 1)))
                if unchanged(e) and key not in seen:
                    seen.add(key)
                    keep.append(i)
            # entries from before identities were recorded: their (unchanged) file's identity is recorded
            unidentified = [i for i in keep if "ino" not in shard.entries[i]]
            if len(keep) == len(shard.entries) and not unidentified:
                continue
            dropped += len(shard.entries) - len(keep)
            features = shard.load_features()[keep] if keep else None
            for i in unidentified:
                st = current[shard.entries[i]["path"]]
                shard.entries[i] = {**shard.entries[i], "dev": int(st.st_dev), "ino": int(st.st_ino)}
            shard.entries = [shard.entries[i] for i in keep]
            shard.features = features
            # on disk: rewritten (or removed) at the commit, so that readers see the index as it was until then
            if shard.path is not None:
                (self._rewrite if keep else self._remove).add(shard.path)
            if not keep:
                self.shards.remove(shard)
        if dropped and log:
            log(f"dropped {dropped} entries of deleted or changed video(s) from the index")
        have: dict[str, set] = {}
        total: dict[str, int] = {}
        for path, (i, n) in seen:
            have.setdefault(path, set()).add(i)
            total[path] = n
        todo = [p for p in files if p in current and len(have.get(p, ())) < total.get(p, 1)]
        return todo, {p: have[p] for p in todo if p in have}

    def _next_shard_number(self) -> int:
        # past every shard file in the folder, those dropped from this run's list too: a shard the last
        # commit listed is never overwritten before the next commit
        names = [os.path.basename(s.path) for s in self.shards if s.path]
        names += os.listdir(os.path.join(self.root, "shards"))
        numbers = [int(m.group(1)) for m in map(SHARD_NUMBER.match, names) if m]
        return max(numbers, default=-1) + 1

    def _next_shard_path(self) -> str:
        return os.path.join(self.root, "shards", f"shard-{self._next_shard_number():06d}.npz")

    def _add_shard(self, features: torch.Tensor, entries: list[dict], on_shard, number: int | None = None) -> None:
        if self.root is None:
            self.shards.append(Shard(None, entries, features))
            return
        path = self._next_shard_path() if number is None else os.path.join(self.root, "shards",
                                                                             f"shard-{number:06d}.npz")
        write_shard(path, features, entries)
        self.shards.append(Shard(path, entries))
        if on_shard is not None:
            on_shard(path)

    def _plan(self, files: list[str], have: dict[str, set], workers: int) -> list[tuple]:
        """[(path, start, end, i, n)]: the ranges still to encode, file by file."""
        seg = self.segmentation
        items = []
        if seg.mode == "whole":
            return [(p, None, None, 0, 1) for p in files]
        for plan in plan_loader(files, seg, self.transform["decoder"], workers, self.transform["ranges"]):
            path = files[plan["index"]]
            if "error" in plan:
                self.failed.append({"path": path, "start": None, "end": None, "reason": plan["error"]})
                continue
            ranges = plan["ranges"]
            done = have.get(path, set())
            items += [(path, a, b, i, len(ranges)) for i, (a, b) in enumerate(ranges) if i not in done]
        return items

    def _plan_files(self, files: list[str], workers: int) -> dict[str, dict]:
        """{path: {"ranges": [(start, end)], "weights": [seconds]} or {"error": reason}}: every range of each
        file (those already indexed too) and its length, which a run split between processes balances by
        (a whole file: its duration; None when unknown)."""
        plans = {}
        for plan in plan_loader(files, self.segmentation, self.transform["decoder"], workers, self.transform["ranges"],
                                durations=True):
            path = files[plan["index"]]
            if "error" in plan:
                plans[path] = {"error": plan["error"]}
                continue
            ranges = [tuple(r) for r in plan["ranges"]]
            weights = ([plan.get("duration")] if ranges == [(None, None)]
                       else [float(b) - float(a) for a, b in ranges])
            plans[path] = {"ranges": ranges, "weights": weights}
        return plans

    def _encoding_dtype(self, precision: str) -> torch.dtype | None:
        """The autocast dtype of ``precision`` on the model's device; records it ("mixed" when an index
        grows with another one)."""
        dtype = autocast_dtype(precision, next(self.model.parameters()).device)
        used = "bf16" if dtype == torch.bfloat16 else "fp32"
        earlier = self.record.get("precision")
        self.record["precision"] = used if earlier in (None, used) or not len(self) else "mixed"
        return dtype

    def _encode(self, files: list[str], have: dict[str, set], batch_size: int, workers: int, precision: str,
                shard_size: int, progress: bool, on_shard, compile_auto=None) -> None:
        self.failed = []
        dtype, items = None, []
        if files:
            dtype = self._encoding_dtype(precision)
            items = self._plan(files, have, workers)
        if compile_auto is not None and self._choose_compiled(compile_auto, len(items)):
            compile_auto.compile()
        if files:
            self._encode_items(items, batch_size, workers, dtype, shard_size, progress, on_shard)

    def _choose_compiled(self, compile_auto, ranges: int, processes: int = 1) -> bool:
        """``--compile auto`` (retrieval.auto_compile.AutoCompile) for a run whose largest share is ``ranges``
        ranges: decided and recorded in the index's kernels; an index that recorded its kernels before this run
        (another run created it while this one waited) keeps its choice. A new index's manifest gets the choice
        before the first shard is written, so that a killed run's next run continues with it."""
        kernels = self.record.get("kernels")
        if self._kernels_recorded:
            return compile_auto.follow(bool(kernels.get("compiled")))
        if not compile_auto.decide(ranges, processes):
            return False
        if kernels is not None:
            kernels["compiled"] = True
            if self._created:
                with commit_lock(self.root, shared=False):
                    _write_json(os.path.join(self.root, "index.json"), self.record)
        return True

    def _encode_items(self, items: list[tuple], batch_size: int, workers: int, dtype, shard_size: int,
                      progress: bool, on_shard, first_number: int | None = None, position: int = 0) -> None:
        """Encode ``items`` ([(path, start, end, i, n)]) in batches of ``batch_size``, into shards of
        ``shard_size`` entries; unreadable ones go to ``self.failed``.

        ``first_number`` (a share of a run split between processes, whose items start at ``position`` in
        the run's list): a shard ends with a batch once it holds ``shard_size`` entries or more (so a
        resumed run starts on a batch of the same list) and is numbered ``first_number`` + the position of
        its first item (numbers of different processes never meet, and their order is the list's)."""
        model = self.model
        transform = self.transform
        loader = video_loader(items, model.config.max_frames, model.image_resolution, batch_size, workers,
                              transform["resize_short_side"], transform["decoder"], transform["ranges"],
                              pin_memory=next(model.parameters()).device.type == "cuda")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc="indexing", unit="segment", dynamic_ncols=True)
        feats, entries, places = [], [], []
        identities = {}
        for batch in loader:
            for i, reason in batch["errors"]:
                path, start, end = items[i][:3]
                self.failed.append({"path": path, "start": start, "end": end, "reason": reason})
            if batch["video"] is not None:
                feats.append(encode_batch(model, batch["video"], batch["mask"], dtype))
                for i, meta in zip(batch["index"], batch["meta"]):
                    path, start, end, seg_i, seg_n = items[i]
                    if path not in identities:
                        identities[path] = file_record(path)
                    entries.append({**identities[path], **meta, "start": start, "end": end, "segment": [seg_i, seg_n]})
                    places.append(position + i)
            if first_number is None:
                while len(entries) >= shard_size:
                    block = torch.cat(feats)
                    self._add_shard(block[:shard_size].clone(), entries[:shard_size], on_shard)
                    feats, entries = [block[shard_size:]], entries[shard_size:]
            elif len(entries) >= shard_size:
                self._add_shard(torch.cat(feats), entries, on_shard, number=first_number + places[0])
                feats, entries, places = [], [], []
            if bar is not None:
                bar.update(len(batch["errors"]) + len(batch["index"]))
        if entries:
            self._add_shard(torch.cat(feats), entries, on_shard,
                            number=None if first_number is None else first_number + places[0])
        if bar is not None:
            bar.close()

    def _commit(self) -> None:
        """Make this run's index the one readers see: rewrite the shards entries were dropped from, remove
        emptied ones, write the manifest (listing the shards) last; under the exclusive commit lock, so no
        reader reads meanwhile (readers hold it shared)."""
        self.record.update(updated=time.time(), num_videos=len(self), num_shards=len(self.shards),
                           dim=int(self.features_dim()),
                           shards=[os.path.basename(s.path) for s in self.shards])
        with commit_lock(self.root, shared=False):
            for shard in self.shards:
                if shard.path in self._rewrite:
                    write_shard(shard.path, shard.features, shard.entries)
            for path in self._remove:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            self._rewrite, self._remove = set(), set()
            _write_json(os.path.join(self.root, "index.json"), self.record)
            _write_json(os.path.join(self.root, "failed.json"), self.failed)

    def features_dim(self) -> int:
        for s in self.shards:
            if s.features is not None:
                return s.features.shape[1]
            if s.entries:
                return s.load_features().shape[1]
        return self.record.get("dim") or 0

    # ------------------------------------------------------------------------------- opening
    @staticmethod
    def _read_meta(index_dir: str) -> dict:
        path = os.path.join(index_dir, "index.json")
        if not os.path.isfile(path):
            raise SearchError(f"{index_dir} is not a video index (no index.json); build one with "
                              "`search_videos.py index`")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *OLD_FORMATS):
                found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
                raise ValueError(f"format {found!r}, expected {FORMAT!r}")
            if not isinstance(meta.get("model"), dict) or "fingerprint" not in meta["model"]:
                raise ValueError("no model fingerprint (model.fingerprint) in it")
        except (ValueError, OSError) as err:
            raise SearchError(f"{path} is unreadable ({first_line(err)})") from err
        return meta

    @classmethod
    def open(cls, index_dir: str, model=None, tokenizer=None, fingerprint: str | None = None) -> "VideoIndex":
        """Open an index folder; with ``model`` (or its ``fingerprint``) a different model is refused.

        The shards read are those the manifest lists (an index run's new shards are not seen before its
        commit; indexes from before the list: every shard file). Features are read on demand; a caller
        that searches while an index run may commit holds :func:`retrieval.locks.reading` around both."""
        with reading(index_dir):
            meta = cls._read_meta(index_dir)
            if model is not None or fingerprint is not None:
                fingerprint = fingerprint or describe_model(model)["fingerprint"]
                if fingerprint != meta["model"]["fingerprint"]:
                    raise SearchError(_other_model_message(index_dir, meta["model"], {"fingerprint": fingerprint}))
            if isinstance(meta.get("shards"), list):
                paths = [os.path.join(index_dir, "shards", name) for name in meta["shards"]]
                for path in paths:
                    if not os.path.isfile(path):
                        raise SearchError(f"the index shard {path} that {index_dir}/index.json lists is missing; "
                                          "run `search_videos.py index` again to re-encode its videos")
            else:
                paths = sorted(glob.glob(os.path.join(index_dir, "shards", SHARD_GLOB)))
            shards = [Shard(p, read_shard(p, entries_only=True)[1]) for p in paths]
            failed = []
            failed_path = os.path.join(index_dir, "failed.json")
            if os.path.isfile(failed_path):
                try:
                    with open(failed_path, encoding="utf-8") as f:
                        failed = json.load(f)
                except (OSError, ValueError):  # only a list for the user: a damaged one is not fatal
                    failed = []
        index = cls(index_dir, meta, shards, failed, model, tokenizer)
        if len(index) == 0:
            raise SearchError(f"the index {index_dir} is empty (no video has been indexed yet)")
        return index

    # ------------------------------------------------------------------------------- searching
    def encode_texts(self, texts, prompts=None) -> torch.Tensor:
        """L2-normalised text features (Q, D) of a list of strings; ``prompts``: the model's prompts computed
        once (``model.prompts()``) by a caller that encodes many times (they depend on the weights only)."""
        from modules.tokenizer import tokenize

        if self.model is None or self.tokenizer is None:
            raise SearchError("searching by text needs the model and its tokenizer (VideoIndex.open(..., "
                              "model=..., tokenizer=...))")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise SearchError("no query given")
        for i, t in enumerate(texts):
            if not str(t).strip():
                raise SearchError(f"query {i + 1} is empty")
        device = next(self.model.parameters()).device
        ids = tokenize(texts, max_words=self.model.config.max_words, tokenizer=self.tokenizer)
        # In batches of texts of about the same length, each batch trimmed to the positions its features
        # depend on (DGL.encode_text): many texts (an evaluation, a QB-norm bank) cost memory by the batch
        # and time by their own lengths.
        order = torch.argsort(ids.argmax(dim=-1), stable=True)
        features = torch.empty(len(texts), self.model.clip.config.embed_dim)
        with torch.inference_mode():
            prompts = prompts or self.model.prompts()
            for lo in range(0, len(texts), TEXT_BATCH):
                rows = order[lo:lo + TEXT_BATCH]
                batch = self.model.encode_text(ids[rows].to(device), prompts=prompts, trim=True)
                features[rows] = torch.nn.functional.normalize(batch.float(), dim=-1).cpu()
        return features

    def search(self, texts, k: int = 10, backend: str = "auto", log=None, per_video: int | None = None) -> list[list[Hit]]:
        """Top-k videos (or time ranges) for each text (a string or a list)."""
        return self.search_features(self.encode_texts(texts), k, backend, log, per_video=per_video)

    def search_video(self, path: str, k: int = 10, backend: str = "auto", log=None,
                     per_video: int | None = None) -> list[Hit]:
        """The videos most similar to ``path`` (its indexed feature when indexed and unchanged)."""
        return self.search_features(self.video_feature(path), k, backend, log, per_video=per_video)[0]

    def video_feature(self, path: str) -> torch.Tensor:
        from retrieval.encode import read_for_model

        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise SearchError(f"query video not found: {path}")
        ident = file_identity(path)
        for shard in self.shards:
            for row, e in enumerate(shard.entries):
                if e["path"] == path and e["size"] == ident["size"] and e["mtime_ns"] == ident["mtime_ns"] \
                        and e.get("start") is None:
                    return shard.load_features()[row:row + 1]
        if self.model is None:
            raise SearchError(f"{path} is not in the index; encoding it needs the model")
        transform = self.transform
        try:  # the whole file, through the transform the index was built with
            video, mask, _ = read_for_model(path, self.model.config.max_frames, self.model.image_resolution,
                                            resize_short_side=transform["resize_short_side"],
                                            decoder=transform["decoder"])
        except Exception as err:  # noqa: BLE001
            raise SearchError(first_line(err)) from err
        precision = "bf16" if self.record.get("precision") == "bf16" else "fp32"
        dtype = autocast_dtype(precision, next(self.model.parameters()).device)
        return encode_batch(self.model, video[None], mask[None], dtype)

    def search_features(self, queries: torch.Tensor, k: int = 10, backend: str = "auto",
                        log=None, per_video: int | None = None, exclude_rows=(), nms_iou: float | None = None
                        ) -> list[list[Hit]]:
        """Top-k for each row of ``queries`` (Q, D), L2-normalised.

        An index with frame-accurate ranges returns the best ``k`` ranges as indexed, a range that overlaps
        a better one of its video with tIoU >= ``nms_iou`` (default retrieval.segments.NMS_IOU) left out
        (retrieval.segments.suppress_overlaps); an index with whole-second ranges takes the best ``k``
        segments and merges those of one video that overlap or touch into one hit
        (retrieval.segments.merge_ranked). At most ``k`` hits; at most ``per_video`` hits per video;
        ``exclude_rows`` are left out (a query segment itself).
        """
        if backend not in BACKENDS:
            raise SearchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        for name, value in (("k", k), ("per_video", per_video)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SearchError(f"{name} must be a positive integer, got {value!r}")
        n = len(self)
        if k > n and log:
            log(f"note: k={k} is larger than the index ({n} entries); returning all")
        backend = self._choose_backend(backend, n)
        entries = self.entries
        exclude = set(int(r) for r in exclude_rows)
        pool = min(n, max(4 * k, 32) + len(exclude))
        while True:
            if backend == "exact":
                scores, rows = exact_topk(queries, (s.load_features() for s in self.shards), pool)
                scores, rows = scores.numpy(), rows.numpy()
            elif backend == "approximate":
                searcher = self.approximate_search(log)
                if log and not getattr(self, "_said_recall", False):
                    log(searcher.recall_line())
                    self._said_recall = True
                scores, rows = searcher.search(queries.numpy(), pool)
            else:
                searcher = self.faiss_searcher(APPROXIMATE.get(backend, "flat"), log=log)
                scores, rows = searcher.search(queries.numpy(), pool)
            results, short = [], False
            for srow, irow in zip(scores, rows):
                candidates = ((float(sc), int(i), entries[i]["path"], entries[i].get("start"), entries[i].get("end"))
                              for sc, i in zip(srow, irow) if i >= 0 and int(i) not in exclude)
                if self.transform["ranges"] == "frames":
                    ranges, exhausted = suppress_overlaps(candidates, k, per_video,
                                                          NMS_IOU if nms_iou is None else nms_iou)
                else:
                    ranges, exhausted = merge_ranked(candidates, k, per_video)
                short |= exhausted
                results.append([Hit(r + 1, m["score"], m["path"], entries[m["rows"][0]], m["start"], m["end"],
                                    len(m["rows"])) for r, m in enumerate(ranges)])
            if not short or pool >= n:
                states = {}  # a hit whose file was deleted or changed since indexing says so
                for hit in (h for hits in results for h in hits):
                    if hit.path not in states:
                        states[hit.path] = file_state(hit.entry)
                    hit.file = states[hit.path]
                return results
            pool = min(n, pool * 4)

    def _choose_backend(self, backend: str, n: int) -> str:
        # auto: exact below `approximate_from` entries (the exact path as it always was: faiss's exact index
        # measured no faster than the built-in search, and approximate search changes results), the
        # approximate search from there when faiss is installed
        if backend == "auto":
            return "approximate" if n >= self.approximate_from and faiss_available() else "exact"
        if (backend.startswith("faiss") or backend == "approximate") and not faiss_available():
            raise SearchError(f"--backend {backend} needs faiss (pip install faiss-cpu)")
        return backend

    def chosen_backend(self, backend: str = "auto") -> str:
        """The search that ``backend`` answers with on this index: exact, approximate, or a faiss one."""
        return self._choose_backend(backend, len(self))

    def approximate_search(self, log=None) -> ApproximateSearch:
        """The approximate search of this index (retrieval.approximate): the saved one when it was built
        over the index as it is now, else built (and saved beside the shards), saying why."""
        if self._approximate is not None:
            return self._approximate
        if self.root is None:
            rows = MemoryRows(self.features().numpy())
            self._approximate = load_or_build(None, rows, lambda: [rows.features], self.shards_id(), log)
        else:
            stats = [os.stat(s.path) for s in self.shards]
            rows = ShardRows([s.path for s in self.shards], [len(s.entries) for s in self.shards],
                             self.features_dim(), [(st.st_size, st.st_mtime_ns) for st in stats])
            chunks = (lambda: (s.load_features().numpy() for s in self.shards))
            self._approximate = load_or_build(self.root, rows, chunks, self.shards_id(), log)
        return self._approximate

    def describe_search(self, backend: str = "auto") -> dict:
        """Which search answers (``/api/status``): exact, or approximate with its kind, settings and recall."""
        chosen = self._choose_backend(backend, len(self))
        if chosen == "approximate":
            return self.approximate_search().describe()
        if chosen == "exact":
            why = ("--backend exact" if backend == "exact" else
                   f"below {self.approximate_from} entries" if len(self) < self.approximate_from else
                   "faiss is not installed (pip install faiss-cpu)")
            return {"mode": "exact", "reason": why, "approximate_from": self.approximate_from}
        return {"mode": chosen}

    def shards_id(self) -> str:
        """The index's content as the manifest lists it: the model, and each shard's name, entry count, size
        and modification time (an index run that adds or rewrites a shard changes it; the folder's path
        does not)."""
        h = hashlib.sha256(self.fingerprint.encode())
        for s in self.shards:
            st = os.stat(s.path) if s.path else None
            name = os.path.basename(s.path) if s.path else "memory"
            h.update(f"|{name}:{len(s.entries)}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}".encode())
        return h.hexdigest()

    def content_id(self) -> str:
        h = hashlib.sha256()
        for s in self.shards:
            st = os.stat(s.path) if s.path else None
            h.update(f"{s.path}:{len(s.entries)}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}".encode())
        return h.hexdigest()

    def faiss_searcher(self, kind: str, log=None, recall_queries: int = 200, k: int = 10) -> FaissSearcher:
        """A faiss index of this index's features; approximate ones are cached in the index folder
        with their recall@k against exact search, measured on ``recall_queries`` indexed videos."""
        if kind == "flat" or self.root is None:
            searcher = FaissSearcher.build(self.features().numpy(), kind)
            if kind != "flat":
                searcher.params["recall"] = self._measure_recall(searcher, recall_queries, k)
                if log:
                    log(_recall_line(searcher))
            return searcher
        base = os.path.join(self.root, f"ann-{kind}")
        cid = self.content_id()
        if os.path.isfile(base + ".json") and os.path.isfile(base + ".faiss"):
            with open(base + ".json", encoding="utf-8") as f:
                info = json.load(f)
            if info.get("content_id") == cid:
                searcher = FaissSearcher.load(base + ".faiss", kind, info["params"])
                if log:
                    log(_recall_line(searcher))
                return searcher
        searcher = FaissSearcher.build(self.features().numpy(), kind)
        searcher.params["recall"] = self._measure_recall(searcher, recall_queries, k)
        atomic_write(base + ".faiss", lambda f: f.write(_faiss_bytes(searcher)))
        _write_json(base + ".json", {"content_id": cid, "params": searcher.params})
        if log:
            log(_recall_line(searcher))
        return searcher

    def _measure_recall(self, searcher: FaissSearcher, num_queries: int, k: int) -> dict:
        features = self.features()
        rng = np.random.default_rng(0)
        pick = rng.choice(features.shape[0], min(num_queries, features.shape[0]), replace=False)
        queries = features[pick]
        k = min(k, features.shape[0])
        _, exact_rows = exact_topk(queries, [features], k)
        _, approx_rows = searcher.search(queries.numpy(), k)
        return {"recall_at_k": recall_at_k(approx_rows, exact_rows.numpy()), "k": k, "queries": len(pick)}


class GroupError(SearchError):
    """An error every process of a group knows (process 0 reports it)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _on_main(group: Group, fn):
    """``fn()`` on process 0, its result on every process; its error (SearchError, a failed write) raised
    on every process as :class:`GroupError`."""
    outcome = None
    if group.is_main:
        try:
            outcome = ("ok", fn())
        except (SearchError, OutputWriteError) as err:
            outcome = ("error", str(err))
        except Exception as err:  # the others must not wait for an answer that never comes
            group.broadcast(("error", f"process 0 stopped ({type(err).__name__}: {_first_line(err)})"))
            raise
    kind, value = group.broadcast(outcome)
    if kind == "error":
        raise GroupError(value)
    return value


def _everywhere(group: Group, fn, after: str = "") -> list:
    """``fn()`` on every process; every process's result, in rank order, on every process once all are done.
    A process's error is raised on every process as :class:`GroupError`, naming the process (``after``
    is added to the message)."""
    try:
        outcome = ("ok", fn())
    except (SearchError, OutputWriteError) as err:
        outcome = ("error", _first_line(err))
    except Exception as err:  # noqa: BLE001 - reported by every process, so none waits forever
        outcome = ("error", f"{type(err).__name__}: {_first_line(err)}")
    outcomes = group.gather(outcome)
    for rank, (kind, value) in enumerate(outcomes):
        if kind == "error":
            raise GroupError(f"process {rank} of {group.world_size}: {value}" + (f"; {after}" if after else ""))
    return [value for _, value in outcomes]


def _faiss_bytes(searcher: FaissSearcher) -> bytes:
    import faiss

    return faiss.serialize_index(searcher.index).tobytes()


def _recall_line(searcher: FaissSearcher) -> str:
    r = searcher.params.get("recall", {})
    settings = ", ".join(f"{k}={v}" for k, v in searcher.params.items() if k != "recall")
    return (f"approximate search (faiss {searcher.kind}, {settings}): recall@{r.get('k')} "
            f"{r.get('recall_at_k', float('nan')):.3f} against exact search on {r.get('queries')} indexed videos")


def _other_model_message(index_dir: str, built: dict, now: dict) -> str:
    files = ", ".join(f"{k} {built[k]}" for k in ("clip_weights", "checkpoint") if built.get(k))
    return (f"the index {index_dir} was built with another model (fingerprint {built['fingerprint'][:12]}"
            f"{'; ' + files if files else ''}); this model's fingerprint is {now['fingerprint'][:12]}: "
            "use the same CLIP weights, checkpoint and flags, or index into a new folder")
