"""search_videos.py serve: the JSON API through FastAPI's TestClient (results equal the library's search,
byte ranges, errors as JSON, unknown ids and path tricks refused, the token, the Host check, an index
that grows while serving), a bounded load test on loopback, and the start-up refusals. The slow test
drives the page in a real headless Chromium."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from retrieval import VideoIndex
from retrieval.segments import Segmentation
from tests.search_fixtures import (assert_plays_within_its_range, make_world, run_cli, search_on_page,
                                   served_in_chromium, write_shots_video)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from retrieval.server import SearchService, create_app  # noqa: E402

SEG = Segmentation(mode="windows", window=4, stride=4, scales=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("server"))
    w = make_world(root)
    w.long_video, _ = write_shots_video(os.path.join(w.videos, "long.mp4"), [4, 5, 4, 3])
    w.model_loaded = w.model()
    w.index_dir = os.path.join(root, "idx")
    VideoIndex.build(w.model_loaded.model, [w.videos], index_dir=w.index_dir, precision="fp32", log=None,
                     segmentation=SEG, model_record=w.model_loaded.info)
    return w


def make_service(world, index_dir=None):
    m = world.model_loaded
    return SearchService(index_dir or world.index_dir, m.model, m.tokenizer, m.info["fingerprint"], log=lambda _: None)


@pytest.fixture(scope="module")
def client(world):
    return TestClient(create_app(make_service(world), allowed_hosts=["testserver"]))


def assert_json_error(response, status: int, *needles):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    for n in needles:
        assert n in body["error"], body


def test_search_api_equals_the_library(world, client):
    r = client.get("/api/search", params={"q": "a red square moves left", "k": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    index = VideoIndex.open(world.index_dir, model=world.model_loaded.model, tokenizer=world.model_loaded.tokenizer)
    hits = index.search(["a red square moves left"], k=5)[0]
    assert [(h["path"], h["start"], h["end"], h["id"]) for h in results] == [(h.path, h.start, h.end, h.id) for h in hits]
    assert [h["score"] for h in results] == pytest.approx([h.score for h in hits], abs=1e-5)
    first = results[0]
    assert {"id", "path", "start", "end", "score", "range", "video_url", "frames_url", "similar_url"} <= set(first)
    assert first["video_url"] == f"/video/{first['id']}"
    # per_video: at most one range of each video
    r = client.get("/api/search", params={"q": "a red square moves left", "k": 50, "per_video": 1})
    paths = [h["path"] for h in r.json()["results"]]
    assert len(paths) == len(set(paths)) == len({e["path"] for e in index.entries})
    # more like this: the entry's own feature, the entry itself left out
    r = client.get(first["similar_url"], params={"k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["query"]["id"] == first["id"] and first["id"] not in [h["id"] for h in body["results"]]
    row = index.entry_rows()[first["id"]]
    expected = index.search_features(index.features()[row:row + 1], k=3, exclude_rows=[row])[0]
    assert [h["id"] for h in body["results"]] == [h.id for h in expected]
    # the page and the status
    page = client.get("/")
    assert page.status_code == 200 and "more like this" in page.text and "/api/search" in page.text
    status = client.get("/api/status").json()
    assert status["entries"] == len(index) and status["segmentation"]["mode"] == "windows"


def test_video_bytes_and_ranges(world, client):
    hit = client.get("/api/search", params={"q": "x", "k": 1}).json()["results"][0]
    data = open(hit["path"], "rb").read()
    r = client.get(hit["video_url"])
    assert r.status_code == 200 and r.content == data and r.headers["content-type"] == "video/mp4"
    r = client.get(hit["video_url"], headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(data)}"
    r = client.get(hit["video_url"], headers={"Range": f"bytes={len(data) - 10}-"})
    assert r.status_code == 206 and r.content == data[-10:]
    r = client.get(hit["frames_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"


def test_errors_are_json_and_paths_are_refused(world, client):
    assert_json_error(client.get("/api/search"), 400, "q")
    assert_json_error(client.get("/api/search", params={"q": "  "}), 400, "q")
    assert_json_error(client.get("/api/search", params={"q": "x", "k": "many"}), 400, "k must be an integer")
    assert_json_error(client.get("/api/search", params={"q": "x", "k": 0}), 400, "k must be between")
    assert_json_error(client.get("/api/search", params={"q": "x", "per_video": -1}), 400, "per_video")
    assert_json_error(client.get("/api/search", params={"q": "x" * 1001}), 400, "longer than")
    assert_json_error(client.get("/api/similar/0123456789abcdef"), 404, "no entry")
    assert_json_error(client.get("/nowhere"), 404)
    secret = world.clip  # a file of the machine that is not an entry
    for url in ["/video/0123456789abcdef", "/video/..%2F..%2F..%2Fetc%2Fpasswd", "/video/%2Fetc%2Fpasswd",
                "/video/../../etc/passwd", f"/video/{secret}", f"/video/{secret.replace('/', '%2F')}",
                "/frames/..%2Findex.json.jpg", "/frames/0123456789abcdef.jpg", "/video/", "/video/%2e%2e"]:
        r = client.get(url)
        assert r.status_code in (404, 405), (url, r.status_code)
        assert b"root:" not in r.content and open(secret, "rb").read(64) not in r.content
        assert r.headers["content-type"].startswith("application/json"), url


def test_video_serves_index_entries_only(world, client, monkeypatch):
    """/video/{id} serves the file of an index entry and nothing else: the names of real files (in the index
    folder, in the videos folder, in the working folder) and near misses of a real id are refused."""
    monkeypatch.chdir(world.videos)  # a handler that opened a name as a path would find these
    hit = client.get("/api/search", params={"q": "x", "k": 1}).json()["results"][0]
    eid = hit["id"]
    assert client.get(f"/video/{eid}").content == open(hit["path"], "rb").read()
    shards = sorted(os.listdir(os.path.join(world.index_dir, "shards")))
    names = (sorted(os.listdir(world.index_dir)) + shards + [f"shards%2F{shards[0]}", os.path.basename(hit["path"]),
             hit["name"], os.path.relpath(hit["path"], world.videos).replace(os.sep, "%2F"),
             eid[:-1], eid + "0", eid.upper(), eid + ".mp4", " " + eid])
    for name in names:
        r = client.get(f"/video/{name}")
        assert (r.status_code, r.headers["content-type"].split(";")[0]) == (404, "application/json"), name
        assert_json_error(r, 404)


def test_token_and_host(world):
    service = make_service(world)
    with TestClient(create_app(service, token="s3cret", allowed_hosts=None)) as c:
        assert_json_error(c.get("/api/search", params={"q": "x"}), 401, "token")
        assert_json_error(c.get("/"), 401)
        assert_json_error(c.get("/api/search", params={"q": "x"}, headers={"Authorization": "Bearer nope"}), 401)
        assert c.get("/api/search", params={"q": "x"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        hit = c.get("/api/search", params={"q": "x", "token": "s3cret"}).json()["results"][0]
        assert_json_error(c.get(hit["video_url"]), 401)
        assert c.get(hit["video_url"], params={"token": "s3cret"}).status_code == 200
    with TestClient(create_app(service, allowed_hosts=["127.0.0.1", "localhost"]), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/status").status_code == 200
        assert_json_error(c.get("/api/status", headers={"Host": "evil.example:8000"}), 400, "Host")


def test_index_growth_picked_up_whole(world, tmp_path):
    idx = str(tmp_path / "idx")
    videos = world.copy_videos(str(tmp_path / "videos"))
    os.remove(os.path.join(videos, "long.mp4"))
    m = world.model_loaded
    kw = dict(precision="fp32", log=None, segmentation=SEG, model_record=m.info)
    VideoIndex.build(m.model, [videos], index_dir=idx, **kw)
    service = make_service(world, idx)
    c = TestClient(create_app(service, allowed_hosts=["testserver"]))
    n0 = c.get("/api/status").json()["entries"]
    # a new shard without a new manifest (a run still going) is not read yet
    extra = os.path.join(videos, "extra.mp4")
    shutil.copy(world.long_video, extra)
    partial = []

    class Stop(Exception):
        pass

    def stop(path):
        partial.append(path)
        raise Stop

    with pytest.raises(Stop):
        VideoIndex.build(m.model, [videos], index_dir=idx, on_shard=stop, shard_size=1, **kw)
    assert c.get("/api/status").json()["entries"] == n0
    VideoIndex.build(m.model, [videos], index_dir=idx, **kw)  # the run finishes: manifest written
    assert c.get("/api/status").json()["entries"] == n0 + 4
    assert any(h["path"] == extra for h in c.get("/api/search", params={"q": "x", "k": 50}).json()["results"])
    # a damaged shard behind a new manifest: the complete earlier reading keeps serving
    shard = sorted(os.listdir(os.path.join(idx, "shards")))[0]
    with open(os.path.join(idx, "shards", shard), "wb") as f:
        f.write(b"damaged")
    os.utime(os.path.join(idx, "index.json"), ns=(1, 1))
    r = c.get("/api/search", params={"q": "x", "k": 50})
    assert r.status_code == 200 and c.get("/api/status").json()["entries"] == n0 + 4


def _serve_in_thread(app):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    return server, thread, sock.getsockname()[1]


def test_bounded_load_on_loopback(world):
    import httpx

    app = create_app(make_service(world), allowed_hosts=["127.0.0.1"])
    server, thread, port = _serve_in_thread(app)
    base = f"http://127.0.0.1:{port}"
    queries = ["a red square", "the blue circle goes down", "a green triangle", "a purple thing moves"]
    statuses, errors = [], []
    deadline = time.time() + 30  # bounded in time as well as in count

    def client(i):
        with httpx.Client(base_url=base, timeout=10) as h:
            for j in range(20):
                if time.time() > deadline:
                    return
                try:
                    r = h.get("/api/search", params={"q": queries[(i + j) % 4], "k": 5})
                    statuses.append(r.status_code)
                    if j % 5 == 0:
                        hit = r.json()["results"][0]
                        statuses.append(h.get(hit["video_url"], headers={"Range": "bytes=0-99"}).status_code - 6)
                except Exception as err:  # noqa: BLE001 - counted, reported below
                    errors.append(repr(err))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=40)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not errors, errors[:3]
    assert len(statuses) >= 40 and set(statuses) == {200}, sorted(set(statuses))


def test_serve_refuses_open_binding_without_token(world, capsys, monkeypatch):
    import uvicorn

    def must_not_serve(*args, **kwargs):
        raise AssertionError(f"serve started: {kwargs}")

    monkeypatch.setattr(uvicorn, "run", must_not_serve)

    def one_line(argv, *needles):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        for n in needles:
            assert n in err
    one_line(["serve", "--index", world.index_dir, "--host", "0.0.0.0"], "--token", "--no_auth")
    one_line(["serve", "--index", world.index_dir, "--token", "a", "--no_auth"], "not both")
    one_line(["serve", "--index", world.index_dir, "--port", "0"], "--port")
    # the command's application: loopback without a token accepts only this machine's Host names
    started = {}

    def capture(app, **kwargs):
        started.update(app=app, **kwargs)

    monkeypatch.setattr(uvicorn, "run", capture)
    assert run_cli(["serve", "--index", world.index_dir, "--device", "cpu", "--port", "8123"], capsys)[0] == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    with TestClient(started["app"], base_url="http://127.0.0.1:8123") as c:
        assert c.get("/api/status").status_code == 200
        assert c.get("/api/status", headers={"Host": "localhost:8123"}).status_code == 200
        assert_json_error(c.get("/api/status", headers={"Host": "rebound.example:8123"}), 400, "Host")
    assert run_cli(["serve", "--index", world.index_dir, "--device", "cpu", "--host", "0.0.0.0", "--token", "t"],
                   capsys)[0] == 0
    with TestClient(started["app"]) as c:
        assert_json_error(c.get("/api/status"), 401)
        assert c.get("/api/status", params={"token": "t"}).status_code == 200


@pytest.mark.slow
def test_page_in_headless_chromium(world, tmp_path):
    """`serve` in its own process on 127.0.0.1; Chromium types a query, sees the cards, plays a range."""
    import httpx

    with served_in_chromium(world.index_dir) as (base, browser):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        # a query whose best range does not start at 0, so that starting at the range shows
        texts = [f"a {c} {s} moves {d}" for c in ("red", "blue", "green", "purple") for s in ("square", "circle")
                 for d in ("left", "up")]
        query = next(t for t in texts if httpx.get(f"{base}/api/search",
                                                   params={"q": t, "k": 1}).json()["results"][0]["start"])
        cards = search_on_page(browser, base, query, 3)
        assert "results for" in browser.find_element(By.ID, "status").text
        ranged = [c for c in cards if float(c.find_element(By.TAG_NAME, "video").get_attribute("data-start")) > 0]
        assert ranged and ranged[0] == cards[0], "the best card should be the range found through the API"
        assert_plays_within_its_range(browser, ranged[0].find_element(By.TAG_NAME, "video"), timeout=30)
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "return Array.from(document.querySelectorAll('img.strip')).every(i => i.complete && i.naturalWidth > 0)"))
        shot = os.environ.get("SEARCH_SCREENSHOT") or str(tmp_path / "page.png")
        browser.save_screenshot(shot)
        assert os.path.getsize(shot) > 0
        # more like this: a new list
        ranged[0].find_element(By.CSS_SELECTOR, "button.more").click()
        WebDriverWait(browser, 30).until(lambda b: "results for like" in b.find_element(By.ID, "status").text)
