"""Approximate search of a large index: a faiss index kept beside the shards, its hits scored exactly.

``approximate.faiss`` in the index folder is a faiss index in three stages: inverted lists
(``IVF{nlist}``, k-means over a sample) of 4-bit product-quantised codes (``PQ{D/4}x4fs``, faiss's "fast
scan" layout: 1 bit per dimension, 64 bytes per entry at 512-d) that propose ``refine`` candidates, an
8-bit scalar-quantised copy of every feature (``Refine(SQ8)``: 1 byte per dimension) that ranks them, and
then the hits' exact features, read from the shard files (a few rows, never a whole shard), score the
best of them exactly: the scores of the hits are the exact search's scores. Memory: the codes and the
8-bit copy (576 bytes per entry at 512-d: 0.55 GiB per million), never the features themselves.

``approximate.json`` records what the faiss file was built over (:meth:`retrieval.index.VideoIndex.shards_id`:
the model and the shards the manifest lists, with their entry counts, sizes and modification times), the
faiss file's own size and modification time, the settings and the recall@10 against exact search measured when
it was built. Both are written atomically (runtime.files), the faiss file first. They are used only when
the record matches the index as it is now and the faiss file is the one recorded: an index that grew or
changed (a new shard, a shard rewritten) has them rebuilt, saying so, and a damaged or mismatched file is
rebuilt, saying so; they are never used stale.

The settings are chosen when it is built, by measurement: ``nprobe`` (lists scanned) and ``refine``
(candidates re-ranked) grow from cheap to thorough until recall@10 against exact search reaches
:data:`TARGET_RECALL` on :data:`RECALL_QUERIES` held-out queries: indexed features as queries, each query's
own entry left out of both result lists (as "more like this" does).
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
import zipfile
from collections import OrderedDict

import numpy as np
import torch

from retrieval.model_io import SearchError
from retrieval.search import exact_topk, recall_at_k
from runtime.files import OutputWriteError, atomic_write

APPROXIMATE_FROM = 200_000  # entries: `auto` searches exactly below, approximately from here (faiss installed)
FILE = "approximate.faiss"
RECORD = "approximate.json"
FORMAT = "dgl-approximate-search/1"
TARGET_RECALL = 0.95
RECALL_QUERIES = 200
RECALL_K = 10
# (nprobe as a share of nlist, refine candidates), cheapest first: the first that reaches the target is kept
SETTINGS = ((1 / 16, 1000), (1 / 8, 2000), (1 / 4, 4000), (1 / 2, 8000), (1.0, 8000), (1.0, 16000))


def choose_nlist(n: int) -> int:
    """Inverted lists: about sqrt(n), a power of 2, at least 39 training points per list (faiss's advice).
    Few lists keep the training short (k-means over 39 points per list, one thread)."""
    target = max(1, min(math.sqrt(n), n / 39))
    return max(1, 2 ** int(round(math.log2(target))))


# ----------------------------------------------------------------------------------- exact rows on demand
def _features_location(f) -> tuple[int, tuple, np.dtype]:
    """(byte offset, shape, dtype) of the ``features`` array inside a shard (.npz, stored uncompressed),
    read from the open binary file ``f``."""
    with zipfile.ZipFile(f) as z:
        info = z.getinfo("features.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError("features are compressed")
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError("bad zip member header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or len(shape) != 2:
        raise ValueError("features are not a C-ordered matrix")
    return f.tell(), shape, dtype


class ShardRows:
    """Rows of the features of an index's shard files, read on demand (``os.pread`` of the rows asked for).

    ``identities``: each shard file's (size, modification time) when the index was read; a file that is
    not that one any more (an index run committed since and rewrote it) is refused, as
    :meth:`retrieval.index.Shard.load_features` refuses it, and so is a file replaced after it was opened."""

    def __init__(self, paths: list[str], counts: list[int], dim: int, identities: list[tuple] | None = None,
                 max_open: int = 64):
        self.paths, self.dim = list(paths), int(dim)
        self.identities = identities
        self.starts = np.cumsum([0, *counts])
        self._open: OrderedDict[int, tuple[int, int, np.dtype]] = OrderedDict()
        self._ident: dict[int, tuple] = {}
        # where each shard's features start, kept for the file it was read from: a shard closed to stay
        # under ``max_open`` (an index of more shards than that, hits spread over all of them) reopens
        # without parsing its zip directory and array header again
        self._located: dict[int, tuple[tuple, int, tuple, np.dtype]] = {}
        self.max_open = max_open
        self._lock = threading.Lock()  # the server's threads share the open files

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _handle(self, s: int) -> tuple[int, int, np.dtype]:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        path = self.paths[s]
        fd = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            located = self._located.get(s)
            if located is not None and located[0] == ident:
                offset, shape, dtype = located[1:]
            else:
                with os.fdopen(os.dup(fd), "rb") as f:  # the location is read from the very file kept open
                    offset, shape, dtype = _features_location(f)
                self._located[s] = (ident, offset, shape, dtype)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            if fd is not None:
                os.close(fd)
            reason = str(err).splitlines()[0] if str(err) else "damaged or truncated"
            raise SearchError(f"corrupt index shard {path} ({type(err).__name__}: {reason}); "
                              "run `search_videos.py index` again to re-encode its videos") from err
        expected = int(self.starts[s + 1] - self.starts[s])
        if self._ident.setdefault(s, ident) != ident or shape != (expected, self.dim) or \
                (self.identities is not None and tuple(self.identities[s]) != (st.st_size, st.st_mtime_ns)):
            os.close(fd)
            raise SearchError(f"the index shard {path} changed while it was being read (an index run finished "
                              "meanwhile): run the command again")
        self._open[s] = (fd, offset, dtype)
        while len(self._open) > self.max_open:
            old_fd = self._open.popitem(last=False)[1][0]
            os.close(old_fd)
        return self._open[s]

    def read(self, rows) -> np.ndarray:
        """float32 (len(rows), D) of the given row numbers (any order; -1 gives zeros): one ``preadv`` per
        row straight into the result, in file order."""
        with self._lock:
            return self._read(rows)

    def _read(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.zeros((len(rows), self.dim), np.float32)
        valid = np.flatnonzero(rows >= 0)
        if not len(valid):
            return out
        valid = valid[np.argsort(rows[valid], kind="stable")]
        shard_of = np.searchsorted(self.starts, rows[valid], side="right") - 1
        view = memoryview(out).cast("B")
        width_out = self.dim * 4
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for part in np.split(np.arange(len(valid)), bounds):
            s = int(shard_of[part[0]])
            fd, offset, dtype = self._handle(s)
            if dtype != np.float32:  # not written by this project: read through numpy
                for i in valid[part]:
                    local = int(rows[i] - self.starts[s])
                    out[i] = np.frombuffer(os.pread(fd, self.dim * dtype.itemsize, offset + local * self.dim * dtype.itemsize),
                                           dtype=dtype)
                continue
            base = offset - int(self.starts[s]) * width_out
            for i, row in zip(valid[part].tolist(), rows[valid[part]].tolist()):
                os.preadv(fd, [view[i * width_out:(i + 1) * width_out]], base + row * width_out)
        return out

    def close(self) -> None:
        with self._lock:
            while self._open:
                os.close(self._open.popitem()[1][0])

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ----------------------------------------------------------------------------------- the search
class MemoryRows:
    """Rows of an in-memory feature matrix (an index that has no folder)."""

    def __init__(self, features: np.ndarray):
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self.dim = self.features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]

    def read(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = self.features[np.maximum(rows, 0)]
        out[rows < 0] = 0
        return out

    def close(self) -> None:
        pass


def _subquantizers(dim: int) -> int:
    """Product-quantiser sub-vectors of 4 dimensions (4 bits each: 1 bit per dimension); a dimension not
    divisible by 4 takes the largest divisor up to dim / 4."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)


class ApproximateSearch:
    """A faiss index over an index's features (``kind``: IVF-PQ with an 8-bit refine, or ``Flat`` for a
    small index), its hits scored by their exact features (``rows``: :class:`ShardRows` or
    :class:`MemoryRows`)."""

    def __init__(self, index, rows, meta: dict):
        self.index, self.rows, self.meta = index, rows, meta

    @property
    def params(self) -> dict:
        return self.meta["params"]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Row numbers (Q, k) the faiss index ranks best (-1 pads)."""
        import faiss

        params = self.params
        if params.get("nprobe"):
            faiss.extract_index_ivf(self.index).nprobe = int(params["nprobe"])
        if params.get("refine") and hasattr(self.index, "k_factor"):
            self.index.k_factor = max(1.0, params["refine"] / k)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first, scored by the exact features; rows -1 (score -inf)
        pad a query with fewer than ``k`` results."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), len(self))
        found_all = self.candidates(q, k)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        for i, found in enumerate(found_all):
            found = found[found >= 0]
            exact = self.rows.read(found) @ q[i]
            best = np.argsort(-exact, kind="stable")
            scores[i, :len(best)], rows[i, :len(best)] = exact[best], found[best]
        return scores, rows

    def describe(self) -> dict:
        """What ``/api/status`` says of it."""
        meta = self.meta
        return {"mode": "approximate", "kind": f"faiss {meta['kind']}, hits scored exactly", **meta["params"],
                "recall_at_10": meta["recall"]["recall_at_k"], "recall_queries": meta["recall"]["queries"],
                "target_recall": meta["recall"]["target"], "entries": meta["entries"], "built": meta["built"],
                "build_seconds": meta["build_seconds"],
                "index_mib": round(meta["index_bytes"] / 2 ** 20, 1) if meta.get("index_bytes") else None}

    def recall_line(self) -> str:
        d = self.describe()
        settings = ", ".join(f"{key} {d[key]}" for key in ("nlist", "nprobe", "refine") if key in d)
        return (f"approximate search (faiss {self.meta['kind']}{', ' + settings if settings else ''}): "
                f"recall@{self.meta['recall']['k']} {d['recall_at_10']:.3f} "
                f"against exact search, measured on {d['recall_queries']} held-out indexed entries when it was "
                "built; --backend exact searches exactly")

    # ------------------------------------------------------------------------------- files
    def save(self, root: str) -> None:
        """The faiss file, then the record naming it (its size and modification time), each written atomically."""
        import faiss

        path = os.path.join(root, FILE)
        atomic_write(path, lambda f: faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write)))
        st = os.stat(path)
        self.meta["index_bytes"] = st.st_size
        record = {**self.meta, "file": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}
        atomic_write(os.path.join(root, RECORD), lambda f: f.write(json.dumps(record, indent=1) + "\n"), mode="w")

    @classmethod
    def read(cls, root: str, rows) -> "ApproximateSearch":
        """The searcher saved in ``root``; ValueError (its reason, one line) when a file is damaged or the
        faiss file is not the one its record names."""
        import faiss

        path, record_path = os.path.join(root, FILE), os.path.join(root, RECORD)
        try:
            with open(record_path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"{record_path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                                 f"expected {FORMAT!r}")
            st = os.stat(path)
            if meta.get("file") != {"size": st.st_size, "mtime_ns": st.st_mtime_ns}:
                raise ValueError(f"{path} is not the file its record {record_path} names (size {st.st_size}, "
                                 f"recorded {(meta.get('file') or {}).get('size')}): damaged or replaced")
            index = faiss.read_index(path)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - any damage is the same problem: build it again
            text = str(err).strip().splitlines()
            raise ValueError(f"{type(err).__name__}: {text[-1] if text else 'damaged or truncated'}") from None
        if index.ntotal != meta.get("entries") or index.d != rows.dim:
            raise ValueError(f"{path} holds {index.ntotal} x {index.d} features, its record says {meta.get('entries')}")
        return cls(index, rows, meta)


def build(rows, chunks, content_id: str, log=None, seed: int = 0, target: float = TARGET_RECALL) -> ApproximateSearch:
    """Build the approximate search over ``rows`` (the index's features; ``chunks()``: them in row order, in
    blocks, read once) and choose its settings by measured recall (module docstring)."""
    import faiss

    started = time.time()
    n, dim = len(rows), rows.dim
    rng = np.random.default_rng(seed)
    if n < 4096:  # too few points to train quantisers: faiss's exact index
        kind, nlist = "Flat", 0
    else:
        nlist = choose_nlist(n)
        kind = f"IVF{nlist},PQ{_subquantizers(dim)}x4fs,Refine(SQ8)"
    index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    if nlist:
        train = rows.read(np.sort(rng.choice(n, min(n, 39 * nlist), replace=False)))
        faiss.extract_index_ivf(index).cp.niter = 10
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # measured: k-means with 2 threads on 2 busy cores ran 10x slower than 1
        try:
            index.train(train)
        finally:
            faiss.omp_set_num_threads(threads)
        del train
    held_out = np.sort(rng.choice(n, min(RECALL_QUERIES, n), replace=False))
    queries = rows.read(held_out)
    k = min(RECALL_K, n - 1)
    best_s = best_i = None
    offset = 0
    for block in chunks():  # one pass: the codes added, and the held-out queries' exact top-k
        block = np.ascontiguousarray(block, dtype=np.float32)
        index.add(block)
        s, i = exact_topk(torch.from_numpy(queries), [torch.from_numpy(block)], k + 1)
        i = i + offset
        offset += len(block)
        if best_s is not None:
            top = torch.cat([best_s, s], 1).topk(min(k + 1, best_s.shape[1] + s.shape[1]), dim=1)
            s, i = top.values, torch.cat([best_i, i], 1).gather(1, top.indices)
        best_s, best_i = s, i
    if offset != n:
        raise SearchError(f"the index's shards hold {offset} features, its entries say {n}: run "
                          "`search_videos.py index` again")
    exact_rows = _without_self(best_i.numpy(), held_out, k)
    meta = {"format": FORMAT, "content_id": content_id, "entries": n, "dim": dim, "kind": kind, "params": {},
            "recall": {}, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "index_bytes": None}  # the faiss file's size, once saved
    settings = [{}] if not nlist else [{"nlist": nlist, "nprobe": max(1, int(round(share * nlist))),
                                        "refine": min(n, refine)} for share, refine in SETTINGS]
    searcher = ApproximateSearch(index, rows, meta)
    for params in settings:
        meta["params"] = params
        found = _without_self(searcher.search(queries, k + 1)[1], held_out, k)
        recall = recall_at_k(found, exact_rows) if k > 0 else 1.0
        meta["recall"] = {"recall_at_k": round(recall, 4), "k": k, "queries": len(held_out), "target": target}
        if recall >= target:
            break
    meta["build_seconds"] = round(time.time() - started, 1)
    if log:
        below = "" if meta["recall"]["recall_at_k"] >= target else \
            f" (below the target {target}: the most thorough settings tried)"
        log(f"approximate search built over {n} entries in {meta['build_seconds']} s: faiss {kind}"
            f"{''.join(f', {a} {b}' for a, b in meta['params'].items())}, recall@{k} "
            f"{meta['recall']['recall_at_k']:.4f} on {len(held_out)} held-out entries{below}")
    return searcher


def _without_self(found: np.ndarray, held_out: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` results other than the query's own entry."""
    out = np.full((len(found), k), -1, np.int64)
    for i, (rows, own) in enumerate(zip(found, held_out)):
        rest = [int(r) for r in rows if r != own and r >= 0][:k]
        out[i, :len(rest)] = rest
    return out


def load_or_build(root: str | None, rows, chunks, content_id: str, log=None) -> ApproximateSearch:
    """The saved approximate search of the index folder ``root`` when it was built over the index as it is
    now (``content_id``); else (missing, damaged, or stale) built again, saying why, and saved."""
    say = log or (lambda _message: None)
    if root and (os.path.exists(os.path.join(root, RECORD)) or os.path.exists(os.path.join(root, FILE))):
        try:
            searcher = ApproximateSearch.read(root, rows)
        except (ValueError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            say(f"the approximate index in {root} is unreadable ({reason}): building it again")
        else:
            if searcher.meta.get("content_id") == content_id and len(searcher) == len(rows):
                return searcher
            then = searcher.meta.get("entries")
            change = f"{then} entries then, {len(rows)} now" if then != len(rows) else "shards rewritten since"
            say(f"the approximate index {os.path.join(root, FILE)} is stale (the index changed since it was built: "
                f"{change}): building it again")
    elif root:
        say(f"building the approximate index {os.path.join(root, FILE)} over {len(rows)} entries (once; kept "
            "for the next searches)")
    searcher = build(rows, chunks, content_id, log)
    if root:
        try:
            searcher.save(root)
        except OutputWriteError as err:
            say(f"warning: {err}; the approximate index is used from memory this time and built again next time")
    return searcher
