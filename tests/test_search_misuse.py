"""search_videos.py under misuse: two index runs into one folder, readers during a run, files swapped
under the server, files deleted after indexing, the server's errors, tokens kept out of `ps`, flags given
nan, and the one-line refusals of a new user's mistakes."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from retrieval import VideoIndex
from retrieval.index import entry_id, read_shard, write_shard
from retrieval.model_io import SearchError
from retrieval.segments import Segmentation
from tests.search_fixtures import make_world, one_line_error, run_cli, write_shots_video

REPO = Path(__file__).resolve().parents[1]
WINDOWS = Segmentation(mode="windows", window=4, stride=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(str(tmp_path_factory.mktemp("misuse")))
    w.loaded = w.model()
    return w


def build(world, videos, idx, **kw):
    m = world.loaded
    return VideoIndex.build(m.model, [str(videos)], index_dir=str(idx), precision="fp32", log=kw.pop("log", None),
                            model_record=m.info, **kw)


def common(world):
    return [*world.model_args(), "--workers", 0, "--precision", "fp32", "--no_progress"]


def paths_of(idx) -> set[str]:
    return {e["path"] for e in VideoIndex.open(str(idx)).entries}


# ------------------------------------------------------------------------------------ one writer at a time
@pytest.mark.slow  # two processes start up and load the model (about 40 s on a loaded 2-core machine)
def test_two_index_runs_at_once_keep_both(world, tmp_path):
    """Two `index` processes started together into one folder, each with its own videos: both succeed and
    the index holds the videos of both."""
    a = Path(world.copy_videos(str(tmp_path / "a")))
    b = a / "more"
    shutil.move(str(b), str(tmp_path / "b"))
    b = tmp_path / "b"
    idx = tmp_path / "idx"
    cmd = [sys.executable, str(REPO / "search_videos.py"), "index", "--index", str(idx), *map(str, common(world)),
           "--shard_size", "1", "--batch_size", "1"]
    procs = [subprocess.Popen([*cmd, str(folder)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for folder in (a, b)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    expected = {str(p) for p in a.glob("*.mp4")} | {str(p) for p in b.glob("*.mp4")}
    assert len(expected) == 6 and paths_of(idx) == expected


HOLD_LOCK = ("import sys, time\nfrom retrieval.locks import writer_lock\nlock = writer_lock(sys.argv[1])\nlock.__enter__()\n"
             "print('held', flush=True)\ntime.sleep(120)\n")


def test_a_run_waits_for_the_lock_and_a_killed_holder_releases_it(world, tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(idx)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines, done = [], []
        runner = threading.Thread(target=lambda: done.append(build(world, world.videos, idx, log=lines.append)))
        runner.start()
        deadline = time.time() + 60
        while not any("waiting" in line for line in lines) and time.time() < deadline and runner.is_alive():
            time.sleep(0.05)
        assert any("waiting: another index run" in line and f"pid {holder.pid}" in line for line in lines), lines
        time.sleep(0.5)
        assert runner.is_alive() and not (idx / "index.json").exists()  # nothing written while it waits
        holder.send_signal(signal.SIGKILL)  # the kernel releases a killed process's lock
        runner.join(timeout=120)
        assert not runner.is_alive() and len(done[0]) == 6
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert len(VideoIndex.open(str(idx))) == 6


def test_readers_see_the_committed_index_only(world, tmp_path):
    """During a run a reader sees the index as the last run left it (no new shard, no entry dropped yet); the
    commit waits for a reader that holds the read lock."""
    from retrieval.locks import reading

    videos = Path(world.copy_videos(str(tmp_path / "videos")))
    idx = tmp_path / "idx"
    build(world, videos, idx, shard_size=2)
    before = VideoIndex.open(str(idx))
    before_rows = {e["path"]: f for e, f in zip(before.entries, before.features())}
    gone = sorted(before_rows)[0]
    os.remove(gone)
    shutil.copy(sorted(before_rows)[1], videos / "extra.mp4")
    seen = []

    def look(_path):
        if not seen:  # after the run's first new shard: dropped entries and new ones not visible yet
            during = VideoIndex.open(str(idx))
            seen.append({e["path"]: f for e, f in zip(during.entries, during.features())})

    build(world, videos, idx, shard_size=1, on_shard=look)
    assert set(seen[0]) == set(before_rows) and all(torch.equal(seen[0][p], before_rows[p]) for p in before_rows)
    after = paths_of(idx)
    assert gone not in after and str(videos / "extra.mp4") in after and len(after) == 6

    # the commit waits for a reader
    os.remove(videos / "extra.mp4")
    manifest = (idx / "index.json").read_bytes()
    finished = []
    with reading(str(idx)):
        runner = threading.Thread(target=lambda: finished.append(build(world, videos, idx)))
        runner.start()
        runner.join(timeout=8)
        assert runner.is_alive() and (idx / "index.json").read_bytes() == manifest
    runner.join(timeout=120)
    assert finished and str(videos / "extra.mp4") not in paths_of(idx)


def test_a_shard_rewritten_under_a_reader_is_refused(world, tmp_path):
    idx = tmp_path / "idx"
    build(world, world.videos, idx, shard_size=4)
    index = VideoIndex.open(str(idx))
    shard = index.shards[0].path
    features, entries = read_shard(shard)
    write_shard(shard, features[:2], entries[:2])  # what an index run's commit does to a shard
    with pytest.raises(SearchError, match="changed while it was being read"):
        index.features()


def test_query_searches_under_the_read_lock(world, tmp_path, capsys, monkeypatch):
    """query holds the index's read lock while it searches (reading features shard by shard), so no
    index run commits in the middle: an exclusive lock cannot be taken then."""
    import fcntl

    from retrieval.locks import COMMIT_LOCK

    idx = tmp_path / "idx"
    build(world, world.videos, idx)
    held = []
    real_search = VideoIndex.search_features

    def probing(self, *args, **kwargs):
        fd = os.open(os.path.join(str(idx), COMMIT_LOCK), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(VideoIndex, "search_features", probing)
    code, out, err = run_cli(["query", "a red square", "--index", idx, "--device", "cpu", "-k", 2], capsys)
    assert code == 0, err
    assert held == [True]


# ------------------------------------------------------------------------------------ the server's files
pytest.importorskip("fastapi")


def serve(world, idx):
    from fastapi.testclient import TestClient

    from retrieval.server import SearchService, create_app

    m = world.loaded
    service = SearchService(str(idx), m.model, m.tokenizer, m.info["fingerprint"], log=lambda _: None)
    return TestClient(create_app(service, allowed_hosts=["testserver"]))


def assert_json_error(response, status: int, *needles):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}
    for n in needles:
        assert n in body["error"], body


def entry_of(idx, path) -> str:
    return next(entry_id(e) for e in VideoIndex.open(str(idx)).entries if e["path"] == str(path))


def look_alike(path: Path, like: Path, content: bytes) -> Path:
    """A file with ``content`` padded to ``like``'s size and given its modification time: only its identity
    (device, inode) tells it apart."""
    size = like.stat().st_size
    path.write_bytes((content * (size // len(content) + 1))[:size])
    os.utime(path, ns=(like.stat().st_atime_ns, like.stat().st_mtime_ns))
    return path


def test_server_sends_only_the_indexed_file(world, tmp_path, monkeypatch):
    videos = Path(world.copy_videos(str(tmp_path / "videos")))
    idx = tmp_path / "idx"
    build(world, videos, idx)
    c = serve(world, idx)
    target = videos / "video0.mp4"
    original = target.read_bytes()
    eid = entry_of(idx, target)
    assert c.get(f"/video/{eid}").content == original
    secret_text = b"root:x:0:0:root:/root:/bin/bash\n"

    # swapped for a link to another file of the same size and time: 409, nothing of it sent
    saved = tmp_path / "saved.mp4"
    os.rename(target, saved)
    secret = look_alike(tmp_path / "secret", saved, secret_text)
    os.symlink(secret, target)
    for url in (f"/video/{eid}", f"/frames/{eid}.jpg"):
        r = c.get(url)
        assert_json_error(r, 409, "not the file that was indexed")
        assert secret_text not in r.content
    os.remove(target)
    # a regular file of the same size and time (a copy put in place): 409 too
    shutil.copy2(secret, target)
    assert_json_error(c.get(f"/video/{eid}"), 409)
    os.remove(target)
    # a FIFO swapped in does not hang the server
    os.mkfifo(target)
    assert_json_error(c.get(f"/video/{eid}"), 409)
    os.remove(target)
    # gone: 404
    assert_json_error(c.get(f"/video/{eid}"), 404, "gone")
    # back in place (the same file): served again
    os.rename(saved, target)
    assert c.get(f"/video/{eid}").content == original

    # the bytes come from the descriptor checked, not from the path opened again: a link swapped in right
    # after the check is not followed
    import retrieval.server as server

    real_open = server.open_indexed_file

    def open_then_swap(entry):
        opened = real_open(entry)
        os.rename(entry["path"], str(saved))
        os.symlink(secret, entry["path"])
        return opened

    monkeypatch.setattr(server, "open_indexed_file", open_then_swap)
    r = c.get(f"/video/{eid}")
    assert r.status_code == 200 and r.content == original
    r = c.get(f"/video/{eid}", headers={"Range": "bytes=0-31"})
    assert r.status_code == 409 or (r.status_code == 206 and r.content == original[:32])


def test_old_entries_without_identity(world, tmp_path):
    """Entries of an index made before identities were recorded: a regular file with the recorded size and
    time is served, a link is not; the next `index` run records the identities without encoding again."""
    videos = Path(world.copy_videos(str(tmp_path / "videos")))
    idx = tmp_path / "idx"
    build(world, videos, idx)
    for shard in (idx / "shards").glob("shard-*.npz"):
        features, entries = read_shard(str(shard))
        write_shard(str(shard), features, [{k: v for k, v in e.items() if k not in ("dev", "ino")} for e in entries])
    c = serve(world, idx)
    target = videos / "video2.mp4"
    eid = entry_of(idx, target)
    assert c.get(f"/video/{eid}").content == target.read_bytes()
    saved = tmp_path / "saved.mp4"
    os.rename(target, saved)
    os.symlink(look_alike(tmp_path / "secret", saved, b"secret "), target)
    assert_json_error(c.get(f"/video/{eid}"), 409, "symbolic link")
    os.remove(target)
    os.rename(saved, target)
    before = VideoIndex.open(str(idx)).features()
    build(world, videos, idx)
    again = VideoIndex.open(str(idx))
    assert all("ino" in e and "dev" in e for e in again.entries) and torch.equal(again.features(), before)


def test_deleted_and_changed_files_are_marked_at_query_time(world, tmp_path, capsys):
    videos = Path(world.copy_videos(str(tmp_path / "videos")))
    idx = tmp_path / "idx"
    build(world, videos, idx)
    os.remove(videos / "video0.mp4")
    with open(videos / "video2.mp4", "ab") as f:
        f.write(b"\0")
    code, out, err = run_cli(["query", "a red square", "--index", idx, "--device", "cpu", "-k", 6,
                              "--json", tmp_path / "r.json", "--html", tmp_path / "r.html"], capsys)
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert page.count("file deleted since indexed</span>") == 1 and page.count("file changed since indexed</span>") == 1
    lines = {line.split()[-4] if "[" in line else line.split()[-1]: line for line in out.splitlines()[2:]}
    assert lines[str(videos / "video0.mp4")].endswith("[deleted since indexed]")
    assert lines[str(videos / "video2.mp4")].endswith("[changed since indexed]")
    assert sum("since indexed]" in line for line in lines.values()) == 2
    assert "2 file(s) among the hits were deleted (1) or changed (1)" in err
    states = {h["path"]: h["file"] for h in json.loads((tmp_path / "r.json").read_text())[0]["results"]}
    assert states[str(videos / "video0.mp4")] == "gone" and states[str(videos / "video2.mp4")] == "changed"
    assert sorted(states.values()).count("ok") == 4
    body = serve(world, idx).get("/api/search", params={"q": "a red square", "k": 6}).json()
    assert {h["path"]: h["file"] for h in body["results"]} == states and "deleted (1) or changed (1)" in body["note"]


def test_every_server_error_is_json(world, tmp_path):
    idx = tmp_path / "idx"
    build(world, world.videos, idx)
    c = serve(world, idx)
    eid = entry_of(idx, Path(world.videos) / "video0.mp4")
    size = os.path.getsize(os.path.join(world.videos, "video0.mp4"))
    for header in ("bytes=abc", "items=0-1", "bytes=5-2", "bytes", "bytes=-"):
        assert_json_error(c.get(f"/video/{eid}", headers={"Range": header}), 400, "Range header")
    r = c.get(f"/video/{eid}", headers={"Range": f"bytes={size + 10}-"})
    assert_json_error(r, 416, "outside the file")
    assert r.headers["content-range"] == f"bytes */{size}"
    assert_json_error(c.post("/api/search", content=b"{not json"), 405)
    assert_json_error(c.delete(f"/video/{eid}"), 405)
    assert_json_error(c.get("/api/search", params={"q": "x", "k": "1e3"}), 400, "integer")
    assert_json_error(c.get("/api/search", params={"q": "x", "k": 10 ** 30}), 400, "between")
    assert_json_error(c.get("/api/similar/" + "z" * 5000), 404, "no entry")
    assert_json_error(c.get("/frames/" + eid), 404)


def test_similar_of_an_entry_in_a_later_shard(world, tmp_path):
    videos = Path(world.copy_videos(str(tmp_path / "videos")))
    write_shots_video(str(videos / "long.mp4"), [4, 5, 4, 3])
    idx = tmp_path / "idx"
    build(world, videos, idx, shard_size=3, segmentation=WINDOWS)
    index = VideoIndex.open(str(idx))
    assert len(index.shards) >= 3
    c = serve(world, idx)
    features = index.features()
    for row in (len(index) - 1, len(index.shards[0].entries) + 1):  # last shard, second shard
        eid = entry_id(index.entries[row])
        body = c.get(f"/api/similar/{eid}", params={"k": 4}).json()
        expected = index.search_features(features[row:row + 1], k=4, exclude_rows=[row])[0]
        assert body["query"]["id"] == eid
        assert [h["id"] for h in body["results"]] == [h.id for h in expected]
        assert [h["score"] for h in body["results"]] == pytest.approx([h.score for h in expected], abs=1e-5)


# ------------------------------------------------------------------------------------ the token
def test_token_from_a_file_or_the_environment(world, tmp_path, capsys, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.delenv("DGL_SEARCH_TOKEN", raising=False)
    idx = tmp_path / "idx"
    build(world, world.videos, idx)
    base = ["serve", "--index", idx, "--device", "cpu", "--host", "0.0.0.0"]
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")

    def needs(token):
        with TestClient(started.pop("app")) as c:
            assert_json_error(c.get("/api/status"), 401)
            assert c.get("/api/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200

    assert run_cli([*base, "--token_file", token_file], capsys)[0] == 0
    needs("from-file")
    monkeypatch.setenv("DGL_SEARCH_TOKEN", "from-env")
    assert run_cli(base, capsys)[0] == 0
    needs("from-env")
    assert run_cli([*base, "--token_file", token_file], capsys)[0] == 0  # the file before the environment
    needs("from-file")
    monkeypatch.delenv("DGL_SEARCH_TOKEN")
    one_line_error([*base, "--token", "a", "--token_file", token_file], capsys, "not both")
    one_line_error([*base, "--token_file", tmp_path / "none"], capsys, "cannot read --token_file")
    (tmp_path / "empty").write_text("\n")
    one_line_error([*base, "--token_file", tmp_path / "empty"], capsys, "first line is empty")
    monkeypatch.setenv("DGL_SEARCH_TOKEN", " ")
    one_line_error(base, capsys, "DGL_SEARCH_TOKEN is set but empty")
    assert "app" not in started  # none of the refused ones started a server


# ------------------------------------------------------------------------------------ one line each
def test_queries_file_not_utf8(world, tmp_path, capsys):
    idx = tmp_path / "idx"
    build(world, world.videos, idx)
    queries = tmp_path / "q.txt"
    queries.write_bytes(b"a red square\n\xff\xfe latin-1 \xe9\n")
    one_line_error(["query", "--queries_file", queries, "--index", idx, "--device", "cpu"], capsys,
                   "q.txt is not UTF-8 text", "0xff")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_float_flags_refuse_nan_and_inf(world, tmp_path, capsys, value):
    idx = tmp_path / "idx"

    def refused(argv, *needles):
        code, out, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("search_videos.py "), err
        assert "error:" in lines[0] and all(n in lines[0] for n in needles), lines[0]

    refused(["index", world.videos, "--index", idx, f"--shot_threshold={value}", *common(world)], "--shot_threshold",
            "finite number")
    assert not idx.exists()
    refused(["evaluate", "--index", idx, "--queries", "q.csv", f"--qb_beta={value}"], "--qb_beta")
    from training.config import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([f"--lr={value}"])
    assert exc.value.code == 2 and "--lr: must be a finite number" in capsys.readouterr().err


def test_no_float_flag_takes_nan():
    """Every program's number flags go through runtime.errors.finite_float (float() takes nan and inf)."""
    import re

    offenders = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(?<![\w.])type\s*=\s*float\b", line):  # a flag's type, not dtype=float
                offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert not offenders, offenders


def test_segmentation_mismatch_names_what_differs(world, tmp_path, capsys):
    long_video, _ = write_shots_video(str(tmp_path / "long.mp4"), [4, 5, 4, 3])
    idx = tmp_path / "idx"
    assert run_cli(["index", long_video, "--index", idx, "--segments", "windows", "--window", 4, "--stride", 4,
                    *common(world)], capsys)[0] == 0
    # a setting windows do not use: both descriptions read "--segments windows --window 4 --stride 4"
    one_line_error(["index", long_video, "--index", idx, "--min_len", 3, *common(world)], capsys,
                   "--min_len 3 (the index: 2)")
    idx2 = tmp_path / "idx2"
    assert run_cli(["index", long_video, "--index", idx2, "--segments", "shots", "--shot_threshold", "27.0000001",
                    *common(world)], capsys)[0] == 0
    line = one_line_error(["index", long_video, "--index", idx2, "--segments", "shots", "--shot_threshold", "27",
                           *common(world)], capsys, "--shot_threshold 27 (the index: 27.0000001)")
    assert line.count("27.0000001") == 1


def test_new_user_mistakes_one_line_nothing_written(world, tmp_path, capsys, monkeypatch):
    idx = tmp_path / "idx"
    build(world, world.videos, idx)
    manifest = (idx / "index.json").read_bytes()
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(["index", world.videos, "--index", afile, *common(world)], capsys, "is a file, not a folder")
    # flags checked before the model is loaded: one line, no start-up report before it
    code, out, err = run_cli(["index", world.videos, "--index", idx, *common(world), "--workers", -1], capsys)
    assert code == 2 and err.strip().splitlines() == ["search_videos.py: error: --workers must be at least 0, got -1"]
    one_line_error(["index", world.videos, "--index", idx, *common(world), "--shard_size", 0], capsys, "--shard_size")
    # an output that is a folder: refused before the search
    code, out, err = run_cli(["query", "x", "--index", idx, "--device", "cpu", "--json", tmp_path], capsys)
    assert code == 2 and out == "" and "--json" in err and "is a folder" in err
    one_line_error(["visualize", os.path.join(world.videos, "video0.mp4"), "--index", idx, "--out", tmp_path,
                    "--device", "cpu"], capsys, "--out", "is a folder")
    # an index.json without its model: says so (not "format X, expected X")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text(json.dumps({"format": "dgl-video-index/2"}))
    line = one_line_error(["query", "x", "--index", broken, "--device", "cpu"], capsys, "no model fingerprint")
    assert "expected" not in line
    # a damaged failed.json (only a list for the user) does not stop a query
    (idx / "failed.json").write_text("{damaged")
    code, out, err = run_cli(["query", "x", "--index", idx, "--device", "cpu", "-k", 1], capsys)
    assert code == 0 and "rank" in out, err
    # a listed shard deleted by hand: one line at query time; the next index run encodes its videos again
    shard = next((idx / "shards").glob("shard-*.npz"))
    os.rename(shard, tmp_path / "away.npz")
    one_line_error(["query", "x", "--index", idx, "--device", "cpu"], capsys, "lists is missing", shard.name)
    assert run_cli(["index", world.videos, "--index", idx, *common(world)], capsys)[0] == 0
    assert len(VideoIndex.open(str(idx))) == 6

    # the disk fills up while a run writes: one line, and readers still see the index as it was
    manifest = (idx / "index.json").read_bytes()
    before = VideoIndex.open(str(idx)).entries
    extra = tmp_path / "more"
    extra.mkdir()
    for i in range(3):
        shutil.copy(os.path.join(world.videos, "video0.mp4"), extra / f"x{i}.mp4")
    import retrieval.index as index_module

    real_write, calls = index_module.atomic_write, []

    def full_disk(path, write_fn, mode="wb"):  # the second shard's write fails as on a full disk
        if os.path.basename(path).startswith("shard-"):
            calls.append(path)
            if len(calls) == 2:
                def fill(f):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(path, fill, mode)
        return real_write(path, write_fn, mode)

    monkeypatch.setattr(index_module, "atomic_write", full_disk)
    one_line_error(["index", extra, "--index", idx, *common(world), "--shard_size", 1], capsys,
                   "no space left on device while writing", "shard-")
    assert (idx / "index.json").read_bytes() == manifest and VideoIndex.open(str(idx)).entries == before
    assert not list((idx / "shards").glob(".*.tmp"))
    monkeypatch.setattr(index_module, "atomic_write", real_write)
    assert run_cli(["index", extra, "--index", idx, *common(world), "--shard_size", 1], capsys)[0] == 0
    assert len(VideoIndex.open(str(idx))) == 9
