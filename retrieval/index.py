"""A searchable index of video features, kept on disk in atomic shards.

Index folder::

    index.json              format, the model record (fingerprint, DGL/CLIP configuration, files),
                            the sampling (max_frames, resolution), counts
    shards/shard-NNNNNN.npz features (n, D) float32, L2-normalised, and entries (JSON): path, size,
                            mtime_ns, duration, num_frames, fps, frames_used
    failed.json             the videos the last run could not read, with the reason
    ann-<kind>.faiss/.json  cached approximate faiss index (optional) and its measured recall

Every file is written under a temporary name and renamed (``os.replace``), so a killed run leaves
complete shards only and the next run continues after them. A file is identified by path, size
and modification time: re-indexing drops deleted or changed files and encodes new or changed ones.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from retrieval.encode import (VIDEO_EXTENSIONS, autocast_dtype, encode_batch, file_identity, find_videos,
                              video_loader)
from retrieval.model_io import SearchError, describe_model
from retrieval.search import APPROXIMATE, BACKENDS, FaissSearcher, exact_topk, faiss_available, recall_at_k
from runtime.files import atomic_write  # temp file + fsync + os.replace

FORMAT = "dgl-video-index/1"
SHARD_GLOB = "shard-*.npz"


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
        features, _ = read_shard(self.path)
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
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            reason = f"{type(err).__name__}: {detail}"
        else:  # numpy's message here advises unpickling the file; say what the file is instead
            reason = "not an .npz archive: damaged or truncated"
        raise SearchError(f"corrupt index shard {path} ({reason}); "
                          "run `search_videos.py index` again to re-encode its videos") from err
    return features, entries


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity
    path: str
    entry: dict

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6), **self.entry}


class VideoIndex:
    """Video features + their manifest, searchable by text, by video or by feature.

    ``VideoIndex.build(model, paths, index_dir=..., tokenizer=...)`` encodes (or updates) an index;
    ``VideoIndex.open(index_dir, model=...)`` opens one, refusing a model other than the one that
    built it; ``index.search(texts, k)`` returns, per text, the top-k :class:`Hit` list.
    """

    def __init__(self, root: str | None, record: dict, shards: list[Shard], failed: list[dict] | None = None,
                 model=None, tokenizer=None):
        self.root, self.record, self.shards = root, record, shards
        self.failed = failed or []
        self.model, self.tokenizer = model, tokenizer

    # ------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return sum(len(s.entries) for s in self.shards)

    @property
    def entries(self) -> list[dict]:
        return [e for s in self.shards for e in s.entries]

    @property
    def fingerprint(self) -> str:
        return self.record["model"]["fingerprint"]

    def features(self) -> torch.Tensor:
        """All features (N, D) in row order (loads every shard)."""
        loaded = [s.load_features() for s in self.shards]
        dim = self.record.get("dim") or 0
        return torch.cat(loaded) if loaded else torch.zeros(0, dim)

    # ------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, model, paths, index_dir: str | None = None, tokenizer=None, batch_size: int = 8,
              workers: int = 0, precision: str = "auto", shard_size: int = 256, progress: bool = False,
              model_record: dict | None = None, on_shard=None, log=print) -> "VideoIndex":
        """Encode the videos under ``paths`` (files or folders, recursively) with ``model``.

        With ``index_dir`` the index is written there in shards of ``shard_size`` videos and an
        existing index is updated (new and changed files encoded, deleted ones dropped). Unreadable
        videos are skipped and listed in ``index.failed``. ``on_shard(path)`` is called after each
        shard is written.
        """
        if batch_size < 1 or shard_size < 1 or workers < 0:
            raise SearchError(f"batch_size and shard_size must be >= 1 and workers >= 0 "
                              f"(got {batch_size}, {shard_size}, {workers})")
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise SearchError(f"no such file or folder: {missing[0]}")
        files = find_videos(paths, exclude=index_dir)
        if not files:
            raise SearchError(f"no video files ({' '.join(VIDEO_EXTENSIONS[:5])} ...) found under "
                              f"{', '.join(map(str, paths))}")
        record = model_record or describe_model(model)
        sampling = {"max_frames": model.config.max_frames, "image_resolution": model.image_resolution,
                    "frames": "evaluation sampling (segment centres)"}
        index = cls._open_for_update(index_dir, record, sampling, log) if index_dir else \
            cls(None, {"format": FORMAT, "model": record, "sampling": sampling}, [])
        index.model, index.tokenizer = model, tokenizer
        todo = index._drop_stale(files, log)
        index._encode(todo, batch_size, workers, precision, shard_size, progress, on_shard)
        if index_dir:
            index._save_manifest()
        if len(index) == 0:
            first = index.failed[0] if index.failed else {"path": "?", "reason": "?"}
            raise SearchError(f"none of the {len(files)} video files could be read "
                              f"(e.g. {first['path']}: {first['reason']})")
        return index

    @classmethod
    def _open_for_update(cls, index_dir: str, record: dict, sampling: dict, log) -> "VideoIndex":
        os.makedirs(os.path.join(index_dir, "shards"), exist_ok=True)
        meta_path = os.path.join(index_dir, "index.json")
        if os.path.exists(meta_path):
            meta = cls._read_meta(index_dir)
            if meta["model"]["fingerprint"] != record["fingerprint"]:
                raise SearchError(_other_model_message(index_dir, meta["model"], record))
        else:
            if glob.glob(os.path.join(index_dir, "shards", SHARD_GLOB)):
                raise SearchError(f"{index_dir} has shards but no index.json; use an empty folder")
            meta = {"format": FORMAT, "model": record, "sampling": sampling, "created": time.time()}
            _write_json(meta_path, meta)
        for pattern in (".*.tmp", os.path.join("shards", ".*.tmp")):  # left by a killed run
            for tmp in glob.glob(os.path.join(index_dir, pattern)):
                os.remove(tmp)
        shards = []
        for path in sorted(glob.glob(os.path.join(index_dir, "shards", SHARD_GLOB))):
            try:  # read whole (not only the entries): a damaged shard is found and re-encoded here
                _, entries = read_shard(path)
            except SearchError as err:
                os.replace(path, path + ".corrupt")
                if log:
                    log(f"warning: {err}; moved to {path}.corrupt and its videos are encoded again")
                continue
            shards.append(Shard(path, entries))
        return cls(index_dir, meta, shards)

    def _drop_stale(self, files: list[str], log) -> list[str]:
        """Drop entries of deleted or changed files (rewriting their shards); return the files to encode.

        Entries of files outside the folders given this time stay while their file is unchanged, so
        indexing another folder into the same index adds to it.
        """
        current = {}
        for path in files:
            try:
                current[path] = file_identity(path)
            except OSError:
                continue

        def unchanged(entry: dict) -> bool:
            ident = current.get(entry["path"])
            if ident is None:
                try:
                    ident = file_identity(entry["path"])
                except OSError:  # deleted
                    return False
            return ident == {k: entry[k] for k in ("path", "size", "mtime_ns")}

        kept_paths, dropped = set(), 0
        for shard in list(self.shards):
            keep = [i for i, e in enumerate(shard.entries) if unchanged(e) and e["path"] not in kept_paths]
            kept_paths.update(shard.entries[i]["path"] for i in keep)
            if len(keep) == len(shard.entries):
                continue
            dropped += len(shard.entries) - len(keep)
            features = shard.load_features()[keep]
            shard.entries = [shard.entries[i] for i in keep]
            if shard.path is None:
                shard.features = features
            elif keep:
                write_shard(shard.path, features, shard.entries)
            else:
                os.remove(shard.path)
            if not keep:
                self.shards.remove(shard)
        if dropped and log:
            log(f"dropped {dropped} deleted or changed video(s) from the index")
        return [p for p in files if p in current and p not in kept_paths]

    def _next_shard_path(self) -> str:
        numbers = [int(os.path.basename(s.path)[6:12]) for s in self.shards if s.path]
        return os.path.join(self.root, "shards", f"shard-{max(numbers, default=-1) + 1:06d}.npz")

    def _add_shard(self, features: torch.Tensor, entries: list[dict], on_shard) -> None:
        if self.root is None:
            self.shards.append(Shard(None, entries, features))
            return
        path = self._next_shard_path()
        write_shard(path, features, entries)
        self.shards.append(Shard(path, entries))
        if on_shard is not None:
            on_shard(path)

    def _encode(self, files: list[str], batch_size: int, workers: int, precision: str, shard_size: int,
                progress: bool, on_shard) -> None:
        self.failed = []
        if not files:
            return
        model = self.model
        device = next(model.parameters()).device
        dtype = autocast_dtype(precision, device)
        used = "bf16" if dtype == torch.bfloat16 else "fp32"
        earlier = self.record.get("precision")
        self.record["precision"] = used if earlier in (None, used) or not len(self) else "mixed"
        loader = video_loader(files, model.config.max_frames, model.image_resolution, batch_size, workers)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(files), desc="indexing", unit="video", dynamic_ncols=True)
        feats, entries = [], []
        for batch in loader:
            for i, reason in batch["errors"]:
                self.failed.append({"path": files[i], "reason": reason})
            if batch["video"] is not None:
                feats.append(encode_batch(model, batch["video"], batch["mask"], dtype))
                entries += [{**file_identity(files[i]), **meta} for i, meta in zip(batch["index"], batch["meta"])]
            while len(entries) >= shard_size:
                block = torch.cat(feats)
                self._add_shard(block[:shard_size].clone(), entries[:shard_size], on_shard)
                feats, entries = [block[shard_size:]], entries[shard_size:]
            if bar is not None:
                bar.update(len(batch["errors"]) + len(batch["index"]))
        if entries:
            self._add_shard(torch.cat(feats), entries, on_shard)
        if bar is not None:
            bar.close()

    def _save_manifest(self) -> None:
        self.record.update(updated=time.time(), num_videos=len(self), num_shards=len(self.shards),
                           dim=int(self.features_dim()))
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
            if meta.get("format") != FORMAT or "fingerprint" not in meta.get("model", {}):
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        except (ValueError, OSError) as err:
            raise SearchError(f"{path} is unreadable ({str(err).splitlines()[0]})") from err
        return meta

    @classmethod
    def open(cls, index_dir: str, model=None, tokenizer=None, fingerprint: str | None = None) -> "VideoIndex":
        """Open an index folder; with ``model`` (or its ``fingerprint``) a different model is refused."""
        meta = cls._read_meta(index_dir)
        if model is not None or fingerprint is not None:
            fingerprint = fingerprint or describe_model(model)["fingerprint"]
            if fingerprint != meta["model"]["fingerprint"]:
                raise SearchError(_other_model_message(index_dir, meta["model"], {"fingerprint": fingerprint}))
        shards = [Shard(p, read_shard(p, entries_only=True)[1])
                  for p in sorted(glob.glob(os.path.join(index_dir, "shards", SHARD_GLOB)))]
        failed = []
        failed_path = os.path.join(index_dir, "failed.json")
        if os.path.isfile(failed_path):
            with open(failed_path, encoding="utf-8") as f:
                failed = json.load(f)
        index = cls(index_dir, meta, shards, failed, model, tokenizer)
        if len(index) == 0:
            raise SearchError(f"the index {index_dir} is empty (no video has been indexed yet)")
        return index

    # ------------------------------------------------------------------------------- searching
    def encode_texts(self, texts) -> torch.Tensor:
        """L2-normalised text features (Q, D) of a list of strings."""
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
        ids = tokenize(texts, max_words=self.model.config.max_words, tokenizer=self.tokenizer).to(device)
        with torch.no_grad():
            return torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1).cpu()

    def search(self, texts, k: int = 10, backend: str = "auto", log=None) -> list[list[Hit]]:
        """Top-k videos for each text (a string or a list)."""
        return self.search_features(self.encode_texts(texts), k, backend, log)

    def search_video(self, path: str, k: int = 10, backend: str = "auto", log=None) -> list[Hit]:
        """The videos most similar to ``path`` (its indexed feature when indexed and unchanged)."""
        return self.search_features(self.video_feature(path), k, backend, log)[0]

    def video_feature(self, path: str) -> torch.Tensor:
        from retrieval.encode import read_for_model

        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise SearchError(f"query video not found: {path}")
        ident = file_identity(path)
        for shard in self.shards:
            for row, e in enumerate(shard.entries):
                if e["path"] == path and e["size"] == ident["size"] and e["mtime_ns"] == ident["mtime_ns"]:
                    return shard.load_features()[row:row + 1]
        if self.model is None:
            raise SearchError(f"{path} is not in the index; encoding it needs the model")
        try:
            video, mask, _ = read_for_model(path, self.model.config.max_frames, self.model.image_resolution)
        except Exception as err:  # noqa: BLE001
            raise SearchError(str(err).splitlines()[0]) from err
        precision = "bf16" if self.record.get("precision") == "bf16" else "fp32"
        dtype = autocast_dtype(precision, next(self.model.parameters()).device)
        return encode_batch(self.model, video[None], mask[None], dtype)

    def search_features(self, queries: torch.Tensor, k: int = 10, backend: str = "auto",
                        log=None) -> list[list[Hit]]:
        """Top-k for each row of ``queries`` (Q, D), L2-normalised."""
        if backend not in BACKENDS:
            raise SearchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SearchError(f"k must be a positive integer, got {k!r}")
        n = len(self)
        if k > n and log:
            log(f"note: k={k} is larger than the index ({n} videos); returning all {n}")
        k = min(k, n)
        backend = self._choose_backend(backend, n)
        if backend == "exact":
            scores, rows = exact_topk(queries, (s.load_features() for s in self.shards), k)
            scores, rows = scores.numpy(), rows.numpy()
        else:
            searcher = self.faiss_searcher(APPROXIMATE.get(backend, "flat"), log=log)
            scores, rows = searcher.search(queries.numpy(), k)
        entries = self.entries
        return [[Hit(r + 1, float(s), entries[i]["path"], entries[i]) for r, (s, i) in enumerate(zip(srow, irow))
                 if i >= 0] for srow, irow in zip(scores, rows)]

    @staticmethod
    def _choose_backend(backend: str, n: int) -> str:
        # auto is exact: faiss's exact index measured no faster than the built-in search (which streams
        # the shards in bounded memory, while faiss holds every feature); approximate search changes
        # results, so it is only used when asked for.
        if backend == "auto":
            return "exact"
        if backend.startswith("faiss") and not faiss_available():
            raise SearchError(f"--backend {backend} needs faiss (pip install faiss-cpu)")
        return backend

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
