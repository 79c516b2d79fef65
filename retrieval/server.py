"""``search_videos.py serve``: a local search page and JSON API over an index (FastAPI, run by uvicorn).

* ``GET /``: the page (search box, result cards with score, range, frame strip and a player that starts
  at the range, "more like this"); it uses only the API below.
* ``GET /api/search?q=TEXT&k=K&per_video=N`` -> ``{"results": [hit, ...]}`` (header ``Server-Timing``: the
  milliseconds spent encoding the text and searching); a hit carries ``id``,
  ``path``, ``start``, ``end`` (seconds; None for a whole file), ``score``, ``range`` and the URLs of its
  video, frame strip and similar ranges.
* ``GET /api/similar/{id}?k=K&per_video=N``: the ranges most like entry ``id`` (its stored feature).
* ``GET /api/status``: the index's size, segmentation and model, and which search answers (``search``:
  ``exact``, or ``approximate`` with its faiss kind, settings and the recall@10 against exact search
  measured when it was built; retrieval.approximate).
* ``GET /video/{id}``: the file of entry ``id`` with byte ranges (the player seeks); ``GET /frames/{id}.jpg``:
  the frames the model saw for that entry. Files are reached only through entry ids of the index, and
  only while the file is the one indexed: it is opened once, its identity (device, inode, size,
  modification time, recorded by ``index``) checked on the open descriptor, and the bytes sent are read
  from that descriptor, so a file or link swapped in at the path is never sent (404 when the file is
  gone, 409 when it changed).
* A hit carries ``file``: ``ok``, or ``gone`` / ``changed`` when its file was deleted or changed since
  it was indexed; a response with such hits carries a ``note``.

Every error is JSON ``{"error": message}`` with a 4xx status (500 without details for a bug), those of
the HTTP layer (a malformed Range header) too. The model and the index are loaded once; when the index's
manifest (index.json, written last by ``index``) changes, the next request loads the new index
completely (under the index's read lock) before it replaces the old one.
"""
from __future__ import annotations

import contextlib
import hmac
import io
import logging
import mimetypes
import os
import threading
import time
from collections import OrderedDict

import torch

from retrieval.index import IndexedFileError, VideoIndex, entry_id, open_indexed_file
from retrieval.locks import reading
from retrieval.model_io import SearchError
from retrieval.segments import format_range
from runtime.errors import first_line

MAX_K = 500
MAX_QUERY_CHARS = 1000
logger = logging.getLogger("search_videos.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Snapshot:
    """One complete reading of the index: entries, the id -> row map, and the search that answers: exact
    over the features in memory, or (a large index) the approximate search, loaded or built here, which
    reads the few features it scores from the shard files."""

    def __init__(self, index: VideoIndex, signature, backend: str = "auto", log=None):
        self.backend = index.chosen_backend(backend)
        self.index, self.signature = index.keep_in_memory(features=self.backend != "approximate"), signature
        if self.backend == "approximate":
            index.approximate_search(log)
            if log:
                log(index.approximate_search().recall_line())
        self.search_info = index.describe_search(backend)
        self.rows = index.entry_rows()
        self.entries = index.entries
        self.videos = len({e["path"] for e in self.entries})


class SearchService:
    """The model (loaded once) and the newest complete reading of the index."""

    def __init__(self, index_dir: str, model, tokenizer, fingerprint: str, log=None, text_cache: int = 256,
                 backend: str = "auto", approximate_from: int | None = None):
        """``backend``: auto (exact below ``approximate_from`` entries, default
        retrieval.approximate.APPROXIMATE_FROM; approximate from there), exact or approximate."""
        self.index_dir, self.model, self.tokenizer, self.fingerprint = index_dir, model, tokenizer, fingerprint
        self.backend, self.approximate_from = backend, approximate_from
        self.log = log or (lambda message: logger.warning(message))
        self._compute = threading.Lock()   # one search at a time: torch already uses every core
        self._reload = threading.Lock()
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache = text_cache
        self._strips: OrderedDict[str, bytes] = OrderedDict()
        with torch.no_grad():  # the prompts depend on the weights only: computed once, not per query
            self._prompts = model.prompts()
        self.snapshot = self._read()

    # ------------------------------------------------------------------------------- the index
    def _signature(self):
        st = os.stat(os.path.join(self.index_dir, "index.json"))
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _read(self) -> Snapshot:
        with reading(self.index_dir):  # the whole index as one index run committed it
            before = self._signature()
            index = VideoIndex.open(self.index_dir, model=self.model, tokenizer=self.tokenizer,
                                    fingerprint=self.fingerprint)
            if self.approximate_from is not None:
                index.approximate_from = self.approximate_from
            snapshot = Snapshot(index, before, self.backend, self.log)
        if self._signature() != before:  # the manifest changed while reading: read again next time
            snapshot.signature = None
        return snapshot

    @property
    def index(self) -> VideoIndex:
        return self.current().index

    def current(self) -> Snapshot:
        """The newest complete snapshot; a changed manifest is read whole first (the old snapshot serves
        meanwhile, and stays when the new reading fails)."""
        try:
            changed = self._signature() != self.snapshot.signature
        except OSError:
            changed = False
        if changed and self._reload.acquire(blocking=False):
            try:
                fresh = self._read()
                self.snapshot = fresh  # cached text features stay valid: the model is the same (fingerprint)
                self.log(f"index reloaded: {len(fresh.entries)} entries")
            except (SearchError, OSError, ValueError) as err:
                self.log(f"index not reloaded (kept the previous one): {first_line(err)}")
            finally:
                self._reload.release()
        return self.snapshot

    # ------------------------------------------------------------------------------- searching
    def _text_feature(self, snap: Snapshot, text: str) -> torch.Tensor:
        cached = self._texts.get(text)
        if cached is not None:
            self._texts.move_to_end(text)
            return cached
        feature = snap.index.encode_texts([text], prompts=self._prompts)
        self._texts[text] = feature
        while len(self._texts) > self._text_cache:
            self._texts.popitem(last=False)
        return feature

    def search(self, text: str, k: int, per_video: int | None, timings: dict | None = None) -> dict:
        """``timings`` (when given) receives the seconds spent encoding the text and searching."""
        snap = self.current()
        with self._compute:
            try:
                started = time.perf_counter()
                feature = self._text_feature(snap, text)
                encoded = time.perf_counter()
                hits = snap.index.search_features(feature, k, backend=snap.backend, per_video=per_video)[0]
            except SearchError as err:
                raise ApiError(400, str(err)) from err
            if timings is not None:
                timings.update(encode=encoded - started, search=time.perf_counter() - encoded)
        return with_note({"query": text, "results": [self.hit_json(h) for h in hits]})

    def similar(self, eid: str, k: int, per_video: int | None) -> dict:
        snap = self.current()
        row = snap.rows.get(eid)
        if row is None:
            raise ApiError(404, f"no entry {eid!r} in the index")
        feature = self._feature(snap, row)
        with self._compute:
            hits = snap.index.search_features(feature, k, backend=snap.backend, per_video=per_video,
                                              exclude_rows=[row])[0]
        return with_note({"query": self.entry_json(snap.entries[row]), "results": [self.hit_json(h) for h in hits]})

    @staticmethod
    def _feature(snap: Snapshot, row: int) -> torch.Tensor:
        if snap.backend == "approximate":  # features are not in memory: the one row from its shard file
            return torch.from_numpy(snap.index.approximate_search().rows.read([row]))
        for shard in snap.index.shards:
            if row < len(shard.entries):
                return shard.load_features()[row:row + 1]
            row -= len(shard.entries)
        raise IndexError(row)

    def entry(self, eid: str) -> dict:
        snap = self.current()
        row = snap.rows.get(eid) if isinstance(eid, str) else None
        if row is None:
            raise ApiError(404, f"no entry {eid!r} in the index")
        return snap.entries[row]

    # ------------------------------------------------------------------------------- JSON
    @staticmethod
    def entry_json(entry: dict) -> dict:
        eid = entry_id(entry)
        start, end = entry.get("start"), entry.get("end")
        shown = (0, entry.get("duration")) if start is None else (start, end)
        return {"id": eid, "path": entry["path"], "name": os.path.basename(entry["path"]), "start": start,
                "end": end, "range": format_range(*shown, entry.get("duration")), "duration": entry.get("duration"),
                "video_url": f"/video/{eid}", "frames_url": f"/frames/{eid}.jpg",
                "similar_url": f"/api/similar/{eid}"}

    def hit_json(self, hit) -> dict:
        out = self.entry_json(hit.entry)
        shown = (0, hit.entry.get("duration")) if hit.start is None else (hit.start, hit.end)
        out.update(rank=hit.rank, score=round(hit.score, 6), start=hit.start, end=hit.end,
                   range=format_range(*shown, hit.entry.get("duration")),
                   segments=hit.segments, best_range=out["range"], file=hit.file)
        return out

    def status(self) -> dict:
        snap = self.current()
        record = snap.index.record
        return {"index": os.path.abspath(self.index_dir), "entries": len(snap.entries), "videos": snap.videos,
                "segmentation": snap.index.segmentation.to_dict(), "sampling": snap.index.transform,
                "model": {"fingerprint": record["model"]["fingerprint"][:12],
                          "checkpoint": os.path.basename(record["model"].get("checkpoint") or "")},
                "search": snap.search_info}

    def frame_strip(self, eid: str) -> bytes:
        entry = self.entry(eid)
        with opened_entry_file(entry, eid) as (fd, _):
            cached = self._strips.get(eid)
            if cached is not None:
                return cached
            from retrieval.html import strip_image

            # decoded through the checked descriptor (Linux: /proc/self/fd), not by reopening the path
            path = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else entry["path"]
            transform = self.current().index.transform
            image = strip_image(path, transform["max_frames"], transform["image_resolution"], entry.get("start"),
                                entry.get("end"), transform["resize_short_side"], transform["decoder"],
                                transform["ranges"])
        if image is None:
            raise ApiError(404, f"the frames of entry {eid} cannot be read now")
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=85)
        data = buf.getvalue()
        self._strips[eid] = data
        while len(self._strips) > 512:
            self._strips.popitem(last=False)
        return data


def with_note(body: dict) -> dict:
    """Adds a ``note`` when hits point to files deleted or changed since they were indexed."""
    stale = {h["path"]: h["file"] for h in body["results"] if h.get("file", "ok") != "ok"}
    if stale:
        gone = sum(1 for state in stale.values() if state == "gone")
        body["note"] = (f"{len(stale)} file(s) among the results were deleted ({gone}) or changed "
                        f"({len(stale) - gone}) since they were indexed (see each result's \"file\"); "
                        "run `search_videos.py index` again to update the index")
    return body


def _indexed_file_api_error(eid: str, err: IndexedFileError) -> ApiError:
    return ApiError(404 if err.state == "gone" else 409, f"entry {eid}: {err}")


@contextlib.contextmanager
def opened_entry_file(entry: dict, eid: str):
    """(descriptor, fstat) of the entry's file while it is the file indexed; ApiError 404/409 otherwise."""
    try:
        fd, st = open_indexed_file(entry)
    except IndexedFileError as err:
        raise _indexed_file_api_error(eid, err) from None
    try:
        yield fd, st
    finally:
        os.close(fd)


def _int_param(value: str | None, name: str, default: int | None, low: int, high: int) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, got {number}")
    return number


def _host_only(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header.split("]")[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def create_app(service: SearchService, token: str | None = None, allowed_hosts: list[str] | None = None):
    """The FastAPI application. ``token``: every request must carry it (``Authorization: Bearer T`` or
    ``?token=T``). ``allowed_hosts``: Host header names accepted (None: any), so that a web page elsewhere
    cannot reach a loopback server through a rebound domain name."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    class DescriptorFileResponse(FileResponse):
        """Starlette's FileResponse (byte ranges, HEAD, If-Range) over a descriptor opened and checked
        before: the bytes are read from that descriptor; its path, /proc/self/fd/N, names the same open
        file should anything reopen it. The descriptor is closed when the response ends."""

        def __init__(self, fd: int, st, media_type: str, headers: dict):
            super().__init__(f"/proc/self/fd/{fd}", stat_result=st, media_type=media_type, headers=headers)
            self.fd = fd

        @contextlib.asynccontextmanager
        async def _open_file(self):
            import anyio

            yield anyio.wrap_file(os.fdopen(self.fd, "rb", closefd=False))

        def close(self) -> None:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

        async def __call__(self, scope, receive, send):
            extensions = {k: v for k, v in (scope.get("extensions") or {}).items() if k != "http.response.pathsend"}
            try:
                await super().__call__({**scope, "extensions": extensions}, receive, send)
            finally:
                self.close()

        def __del__(self):  # a response never sent
            self.close()

    app = FastAPI(title="DGL video search", docs_url=None, redoc_url=None, openapi_url=None)
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def as_json_error(request: Request, response) -> JSONResponse:
        """An error answered below the application's handlers (Starlette's plain-text answers to a malformed
        or unsatisfiable Range header) as JSON, like every other error."""
        body = b"".join([chunk async for chunk in response.body_iterator])[:500]
        text = body.decode("utf-8", "replace").strip()
        http_range = request.headers.get("range")
        if http_range is not None and response.status_code == 416:
            text = f"Range header {http_range!r} is outside the file ({response.headers.get('content-range', '')})"
        elif http_range is not None and response.status_code == 400:
            text = f"malformed Range header {http_range!r}" + (f": {text}" if text else "")
        out = error(response.status_code, text or f"HTTP error {response.status_code}")
        if "content-range" in response.headers:
            out.headers["Content-Range"] = response.headers["content-range"]
        return out

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None and _host_only(request.headers.get("host", "")).lower() not in hosts:
            return error(400, "unexpected Host header")
        if token is not None:
            given = request.query_params.get("token")
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return error(401, "this server needs its token: Authorization: Bearer <token>, or ?token=<token>")
        response = await call_next(request)
        if response.status_code >= 400 and not response.headers.get("content-type", "").startswith("application/json"):
            response = await as_json_error(request, response)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return error(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        logger.error("internal error: %s: %s", type(exc).__name__, exc)
        return error(500, "internal error (the server's log says more)")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @app.get("/api/search")
    def api_search(q: str | None = None, k: str | None = None, per_video: str | None = None):
        if q is None or not q.strip():
            raise ApiError(400, "q (the query text) is missing or empty")
        if len(q) > MAX_QUERY_CHARS:
            raise ApiError(400, f"q is longer than {MAX_QUERY_CHARS} characters")
        timings = {}
        body = service.search(q.strip(), _int_param(k, "k", 10, 1, MAX_K),
                              _int_param(per_video, "per_video", None, 1, MAX_K), timings)
        return JSONResponse(body, headers={"Server-Timing": ", ".join(f"{name};dur={1e3 * seconds:.2f}"
                                                                      for name, seconds in timings.items())})

    @app.get("/api/similar/{eid}")
    def api_similar(eid: str, k: str | None = None, per_video: str | None = None):
        return service.similar(eid, _int_param(k, "k", 10, 1, MAX_K), _int_param(per_video, "per_video", None, 1, MAX_K))

    @app.get("/api/status")
    def api_status():
        return service.status()

    @app.get("/video/{eid}")
    def video(eid: str):
        entry = service.entry(eid)
        try:
            fd, st = open_indexed_file(entry)
        except IndexedFileError as err:
            raise _indexed_file_api_error(eid, err) from None
        media = mimetypes.guess_type(entry["path"])[0] or "application/octet-stream"
        return DescriptorFileResponse(fd, st, media, {"Cache-Control": "no-store"})

    @app.get("/frames/{name}")
    def frames(name: str):
        if not name.endswith(".jpg"):
            raise ApiError(404, "not found")
        return Response(service.frame_strip(name[:-4]), media_type="image/jpeg")

    return app


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Video search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #f4f4f4; }
header { background: #fff; border-bottom: 1px solid #ddd; padding: 14px 24px; position: sticky; top: 0; }
form { display: flex; gap: 8px; align-items: center; }
#q { flex: 1; font-size: 17px; padding: 8px 10px; border: 1px solid #bbb; border-radius: 6px; }
button { font-size: 15px; padding: 8px 14px; border-radius: 6px; border: 1px solid #888; background: #fff; cursor: pointer; }
#status { color: #666; font-size: 13px; margin-top: 6px; }
main { padding: 12px 24px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 10px 12px; margin: 10px 0;
        display: grid; grid-template-columns: 320px 1fr; gap: 12px; }
.card video { width: 320px; background: #000; border-radius: 4px; }
.meta { display: flex; gap: 14px; align-items: baseline; font-size: 14px; flex-wrap: wrap; }
.score { font-family: monospace; }
.range { font-weight: bold; font-family: monospace; font-size: 15px; }
.name { color: #444; word-break: break-all; }
.strip { display: block; max-width: 100%; height: 72px; margin: 8px 0; image-rendering: pixelated; }
.error { color: #a00; }
</style></head>
<body>
<header><form id="f"><input id="q" name="q" placeholder="describe the moment, e.g. a man is cooking" autofocus>
<label>k <input id="k" type="number" min="1" max="100" value="10" style="width:4em"></label>
<label>per video <input id="pv" type="number" min="1" max="100" value="" style="width:4em"></label>
<button type="submit" id="go">Search</button></form><div id="status"></div></header>
<main id="results"></main>
<script>
const token = new URLSearchParams(location.search).get("token");
function withToken(url) { return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url; }
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
async function api(url) {
  const r = await fetch(withToken(url));
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
function card(hit) {
  const c = el("div", "card"); c.dataset.id = hit.id;
  const v = el("video"); v.controls = true; v.preload = "metadata"; v.muted = true;
  const t = hit.start === null ? "" : "#t=" + hit.start + "," + hit.end;
  v.src = withToken(hit.video_url) + t;
  v.dataset.start = hit.start === null ? 0 : hit.start; v.dataset.end = hit.end === null ? "" : hit.end;
  c.appendChild(v);
  const right = el("div");
  const meta = el("div", "meta");
  meta.appendChild(el("span", "rank", "#" + hit.rank));
  meta.appendChild(el("span", "range", hit.range));
  meta.appendChild(el("span", "score", "score " + hit.score.toFixed(4)));
  meta.appendChild(el("span", "name", hit.name));
  if (hit.file && hit.file !== "ok") meta.appendChild(el("span", "error", "file " + (hit.file === "gone" ? "deleted" : "changed") + " since indexed"));
  right.appendChild(meta);
  const img = el("img", "strip"); img.alt = "the frames the model saw"; img.src = withToken(hit.frames_url);
  right.appendChild(img);
  if (hit.segments > 1) right.appendChild(el("div", "name", hit.segments + " ranges merged; frames of the best one, " + hit.best_range));
  const more = el("button", "more", "more like this");
  more.onclick = () => run(hit.similar_url, "like " + hit.name + " " + hit.range);
  right.appendChild(more);
  const path = el("div", "name", hit.path); path.style.fontSize = "12px"; right.appendChild(path);
  c.appendChild(right);
  return c;
}
async function run(url, label) {
  const status = document.getElementById("status"), out = document.getElementById("results");
  status.textContent = "searching..."; status.className = "";
  try {
    const body = await api(url);
    out.replaceChildren(...body.results.map(card));
    status.textContent = body.results.length + " results for " + label + (body.note ? " - " + body.note : "");
  } catch (e) { status.textContent = e.message; status.className = "error"; }
}
document.getElementById("f").onsubmit = (ev) => {
  ev.preventDefault();
  const q = document.getElementById("q").value.trim(); if (!q) return;
  const p = new URLSearchParams({q: q, k: document.getElementById("k").value || "10"});
  const pv = document.getElementById("pv").value; if (pv) p.set("per_video", pv);
  run("/api/search?" + p.toString(), JSON.stringify(q));
};
api("/api/status").then(s => { document.getElementById("status").textContent =
  s.entries + " entries of " + s.videos + " videos (" + s.segmentation.mode + ")"; })
  .catch(e => { document.getElementById("status").textContent = e.message; });
</script></body></html>
"""
