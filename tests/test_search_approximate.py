"""The approximate search of a large index (retrieval.approximate): its recall against exact search, the
exact path kept below the threshold, an index that grows or changes never searched through a stale faiss
file, a damaged faiss file rebuilt with a clear line, and what the server's /api/status says."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from retrieval.index import FORMAT, VideoIndex, _write_json, transform_record, write_shard
from retrieval.search import exact_topk, faiss_available, recall_at_k
from retrieval.segments import Segmentation

pytestmark = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")


def unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def add_shard(folder: str, number: int, x: np.ndarray, first: int) -> None:
    """Shard ``number`` holding rows ``x``: ranges of 50-range videos, never overlapping."""
    entries = [{"path": f"/videos/v{(first + i) // 50:05d}.mp4", "size": 1, "mtime_ns": 1, "duration": 400.0,
                "start": ((first + i) % 50) * 8.0, "end": ((first + i) % 50) * 8.0 + 8.0,
                "segment": [(first + i) % 50, 50]} for i in range(len(x))]
    write_shard(os.path.join(folder, "shards", f"shard-{number:06d}.npz"), torch.from_numpy(x), entries)


def commit(folder: str, model_record: dict, dim: int) -> None:
    """index.json listing every shard, as an index run's commit writes it."""
    shards = sorted(os.listdir(os.path.join(folder, "shards")))
    _write_json(os.path.join(folder, "index.json"), {
        "format": FORMAT, "model": model_record, "sampling": transform_record(4, 32),
        "segmentation": Segmentation(mode="windows", window=8, stride=8).to_dict(), "dim": dim, "shards": shards})


def clustered_rows(rng, n: int, d: int, clusters: int = 40) -> np.ndarray:
    """Unit features around ``clusters`` centres (as real features cluster): a cheap index to search."""
    centres = unit_rows(rng, clusters, d)
    x = centres[rng.integers(clusters, size=n)] + 0.5 * unit_rows(rng, n, d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_index(folder: str, n: int, d: int, seed: int = 0, shard: int = 2048,
                 model_record: dict | None = None, clustered: bool = False) -> np.ndarray:
    os.makedirs(os.path.join(folder, "shards"))
    rng = np.random.default_rng(seed)
    x = clustered_rows(rng, n, d) if clustered else unit_rows(rng, n, d)
    for number, start in enumerate(range(0, n, shard)):
        add_shard(folder, number, x[start:start + shard], start)
    commit(folder, model_record or {"fingerprint": "f" * 64}, d)
    return x


def hits_rows(hits, index: VideoIndex) -> list[list[int]]:
    rows = index.entry_rows()
    return [[rows[h.id] for h in per_query] for per_query in hits]


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """20,000 random 64-d features, made "large" by a threshold of 1,000 entries, and its built search."""
    folder = str(tmp_path_factory.mktemp("approx") / "idx")
    x = random_index(folder, 20_000, 64)
    index = VideoIndex.open(folder)
    lines = []
    index.approximate_search(log=lines.append)
    return folder, x, lines


def test_recall_against_exact_on_a_random_index(large):
    folder, x, lines = large
    assert any("building the approximate index" in line for line in lines), lines
    index = VideoIndex.open(folder)
    index.approximate_from = 1000
    assert index.chosen_backend() == "approximate"
    info = index.describe_search()
    assert info["mode"] == "approximate" and info["kind"].startswith("faiss IVF") and info["recall_queries"] == 200
    assert info["recall_at_10"] >= 0.95 and info["nprobe"] <= info["nlist"] and info["refine"] <= 20_000
    queries = torch.from_numpy(unit_rows(np.random.default_rng(7), 40, 64))
    approx = index.search_features(queries, k=10)           # auto: approximate from 1,000 entries
    exact = index.search_features(queries, k=10, backend="exact")
    recall = recall_at_k(np.array(hits_rows(approx, index)), np.array(hits_rows(exact, index)))
    assert recall >= 0.9, recall                              # new queries, not the held-out ones
    rows = index.entry_rows()
    for per_query, q in zip(approx, queries):                 # the hits are scored exactly
        assert np.allclose([h.score for h in per_query], [float(x[rows[h.id]] @ q.numpy()) for h in per_query],
                           atol=1e-5)
    # the recall recorded at build time is the share of the true top 10 found (own entry left out)
    searcher = index.approximate_search()
    held = np.random.default_rng(3).choice(len(x), 30, replace=False)
    _, true_rows = exact_topk(torch.from_numpy(x[held]), [torch.from_numpy(x)], 11)
    found = searcher.search(x[held], 11)[1]
    ours = [[r for r in row if r != own][:10] for row, own in zip(found.tolist(), held)]
    theirs = [[r for r in row if r != own][:10] for row, own in zip(true_rows.tolist(), held)]
    assert recall_at_k(np.array(ours), np.array(theirs)) >= 0.9


def test_exact_path_unchanged_below_the_threshold(large):
    folder, x, _ = large
    copy = folder + "-exact"
    shutil.copytree(os.path.join(folder, "shards"), os.path.join(copy, "shards"))
    shutil.copy(os.path.join(folder, "index.json"), copy)
    index = VideoIndex.open(copy)                              # 20,000 < the default threshold
    assert index.chosen_backend() == "exact"
    assert index.describe_search() == {"mode": "exact", "reason": f"below {index.approximate_from} entries",
                                       "approximate_from": index.approximate_from}
    queries = torch.from_numpy(unit_rows(np.random.default_rng(8), 5, 64))
    auto = index.search_features(queries, k=10, per_video=2)
    exact = index.search_features(queries, k=10, per_video=2, backend="exact")
    assert [[h.to_dict() for h in q] for q in auto] == [[h.to_dict() for h in q] for q in exact]
    top = (queries @ torch.from_numpy(x).t()).topk(1, dim=1)
    assert hits_rows(auto, index)[0][0] == int(top.indices[0, 0])
    assert not os.path.exists(os.path.join(copy, "approximate.faiss"))  # nothing built below the threshold


def small_copy(tmp_path, n: int = 6000, d: int = 32) -> tuple[str, np.ndarray]:
    folder = str(tmp_path / "idx")
    return folder, random_index(folder, n, d, seed=1, clustered=True)


def test_an_index_that_grows_or_changes_is_never_searched_stale(tmp_path):
    folder, x = small_copy(tmp_path)
    VideoIndex.open(folder).approximate_search()
    # an index run adds a shard: the next reader rebuilds, and the new entries are found
    new = clustered_rows(np.random.default_rng(9), 500, 32)
    add_shard(folder, 99, new, len(x))
    commit(folder, {"fingerprint": "f" * 64}, 32)
    index = VideoIndex.open(folder)
    lines = []
    searcher = index.approximate_search(log=lines.append)
    assert any("is stale" in line and "6000 entries then, 6500 now" in line for line in lines), lines
    assert len(searcher) == 6500
    index.approximate_from = 1
    hit = index.search_features(torch.from_numpy(new[123:124]), k=1)[0][0]
    assert hit.entry["start"] == ((6000 + 123) % 50) * 8.0 and abs(hit.score - 1) < 1e-5
    # an index run rewrites a shard (same count, other features): rebuilt again, not used
    add_shard(folder, 0, clustered_rows(np.random.default_rng(10), 2048, 32), 0)
    commit(folder, {"fingerprint": "f" * 64}, 32)
    lines = []
    VideoIndex.open(folder).approximate_search(log=lines.append)
    assert any("is stale" in line and "shards rewritten since" in line for line in lines), lines
    # unchanged: loaded, not rebuilt, and says nothing
    lines = []
    VideoIndex.open(folder).approximate_search(log=lines.append)
    assert lines == []


def test_a_shard_rewritten_under_a_searcher_is_refused(tmp_path):
    from retrieval.model_io import SearchError

    folder, x = small_copy(tmp_path)
    VideoIndex.open(folder).approximate_search()
    searcher = VideoIndex.open(folder).approximate_search()        # loaded: no shard opened yet
    assert np.array_equal(searcher.rows.read([3, 2050]), x[[3, 2050]])  # shards 0 and 1 opened
    add_shard(folder, 2, clustered_rows(np.random.default_rng(11), 1904, 32), 4096)  # an index run rewrites
    with pytest.raises(SearchError, match="shard-000002.npz changed while it was being read"):
        searcher.rows.read([4100])                                   # never opened before the rewrite
    add_shard(folder, 0, clustered_rows(np.random.default_rng(12), 2048, 32), 0)
    assert np.array_equal(searcher.rows.read([3]), x[[3]])         # still the file opened before


def test_a_damaged_approximate_file_is_rebuilt_with_a_clear_line(tmp_path):
    folder, x = small_copy(tmp_path)
    VideoIndex.open(folder).approximate_search()
    path = os.path.join(folder, "approximate.faiss")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    lines = []
    index = VideoIndex.open(folder)
    searcher = index.approximate_search(log=lines.append)
    assert len(lines) == 2 and "approximate index" in lines[0] and "unreadable" in lines[0] \
        and "building it again" in lines[0] and "\n" not in lines[0], lines
    assert len(searcher) == len(x)
    assert index.search_features(torch.from_numpy(x[5:6]), k=1, backend="approximate")[0][0].score > 0.9999
    # a record that is not JSON: the same
    with open(os.path.join(folder, "approximate.json"), "w") as f:
        f.write("{not json")
    lines = []
    VideoIndex.open(folder).approximate_search(log=lines.append)
    assert "unreadable" in lines[0] and "building it again" in lines[0], lines
    lines = []
    VideoIndex.open(folder).approximate_search(log=lines.append)
    assert lines == []  # rebuilt and saved whole


def test_server_status_says_which_search_answers(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from modules.clip import CLIP, tiny_clip_config
    from modules.dgl import DGL, DGLConfig
    from modules.tokenizer import get_tokenizer, write_bpe_vocab
    from retrieval.model_io import describe_model
    from retrieval.server import SearchService, create_app

    bpe = write_bpe_vocab(["a red square moves left", "a blue circle"], str(tmp_path / "bpe.txt.gz"), num_merges=20)
    tokenizer = get_tokenizer(bpe_path=bpe)
    torch.manual_seed(0)
    model = DGL(CLIP(tiny_clip_config(vocab_size=tokenizer.vocab_size)),
                DGLConfig(max_frames=4, shared_latent_space="linear", unified_transformer_layers=1)).eval()
    record = describe_model(model)
    folder = str(tmp_path / "idx")
    x = random_index(folder, 6000, model.clip.config.embed_dim, model_record=record, clustered=True)

    def status_and_search(**options):
        service = SearchService(folder, model, tokenizer, record["fingerprint"], log=lambda _: None, **options)
        client = TestClient(create_app(service, allowed_hosts=["testserver"]))
        status = client.get("/api/status").json()
        answer = client.get("/api/search", params={"q": "a red square", "k": 5})
        timing = dict(item.strip().split(";dur=") for item in answer.headers["server-timing"].split(","))
        assert set(timing) == {"encode", "search"} and all(float(v) >= 0 for v in timing.values())
        return service, client, status, answer.json()["results"]

    _, _, exact_status, exact_found = status_and_search()
    assert exact_status["search"] == {"mode": "exact", "reason": "below 200000 entries", "approximate_from": 200000}
    service, client, status, found = status_and_search(approximate_from=5000)
    search = status["search"]
    assert search["mode"] == "approximate" and search["kind"].startswith("faiss IVF")
    assert set(search) >= {"nlist", "nprobe", "refine", "recall_at_10", "recall_queries", "build_seconds", "built"}
    assert 0.9 <= search["recall_at_10"] <= 1 and search["entries"] == 6000
    assert not any(s.features is not None for s in service.snapshot.index.shards)  # features stay on disk
    assert [h["id"] for h in found] == [h["id"] for h in exact_found]  # a text query, 5 of 6,000: the same hits
    similar = client.get(found[0]["similar_url"], params={"k": 3}).json()["results"]
    assert len(similar) == 3 and found[0]["id"] not in [h["id"] for h in similar]
    forced = status_and_search(backend="exact", approximate_from=5000)[2]["search"]
    assert forced["mode"] == "exact" and forced["reason"] == "--backend exact"
    assert x.shape == (6000, 64)


@pytest.mark.parametrize("command", ["query", "serve"])
def test_approximate_from_must_be_positive(tmp_path, capsys, command):
    from retrieval.cli import main

    argv = [command, *(["a text"] if command == "query" else []), "--index", str(tmp_path), "--approximate_from", "0"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == ["search_videos.py: error: --approximate_from must be at least 1, got 0"]


def test_an_index_in_memory_searches_approximately_without_a_folder():
    from retrieval.index import Shard

    x = clustered_rows(np.random.default_rng(4), 5000, 16)
    entries = [{"path": f"/videos/v{i // 50:05d}.mp4", "size": 1, "mtime_ns": 1, "start": (i % 50) * 8.0,
                "end": (i % 50) * 8.0 + 8.0, "segment": [i % 50, 50]} for i in range(len(x))]
    record = {"format": FORMAT, "model": {"fingerprint": "f" * 64}, "sampling": transform_record(4, 32),
              "segmentation": Segmentation(mode="windows", window=8, stride=8).to_dict(), "dim": 16}
    index = VideoIndex(None, record, [Shard(None, entries[:3000], torch.from_numpy(x[:3000])),
                                      Shard(None, entries[3000:], torch.from_numpy(x[3000:]))])
    index.approximate_from = 1000
    queries = torch.from_numpy(x[[10, 3500]])
    approx = index.search_features(queries, k=5)
    assert index.describe_search()["mode"] == "approximate"
    assert [[h.entry["start"] for h in q][0] for q in approx] == [80.0, 0.0]  # each query finds itself first
    exact = index.search_features(queries, k=5, backend="exact")
    assert recall_at_k(np.array(hits_rows(approx, index)), np.array(hits_rows(exact, index))) >= 0.8


def test_shards_closed_to_stay_under_max_open_reopen_without_parsing_again(tmp_path, monkeypatch):
    """An index of more shards than ShardRows keeps open (hits spread over all of them, as at a million
    ranges): each query reopens shards, and must not parse their zip directory and header again."""
    from retrieval import approximate

    folder, x = small_copy(tmp_path)  # 3 shards
    index = VideoIndex.open(folder)
    rows = approximate.ShardRows([s.path for s in index.shards], [len(s.entries) for s in index.shards],
                                 x.shape[1], max_open=1)
    parsed = []
    real = approximate._features_location
    monkeypatch.setattr(approximate, "_features_location", lambda f: parsed.append(1) or real(f))
    wanted = [5, 2100, 4500, 7, 4096, 2047]
    for _ in range(3):
        assert np.array_equal(rows.read(wanted), x[wanted])
    assert len(parsed) == 3, parsed  # once per shard, though each was closed and reopened twice
    assert len(rows._open) == 1
    # a shard rewritten since is located again (and refused as changed, as before)
    from retrieval.model_io import SearchError

    add_shard(folder, 2, clustered_rows(np.random.default_rng(11), 1904, 32), 4096)
    rows.read([5])  # shard 2 closed
    with pytest.raises(SearchError, match="shard-000002.npz changed while it was being read"):
        rows.read([4100])
    assert len(parsed) == 4
