"""search_videos.py and retrieval/: index -> query round trip, incremental re-index, resume after a
kill, faiss against exact search, the explicit attention path, pictures, results page, bad input."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from retrieval import VideoIndex
from retrieval.search import exact_topk, faiss_available
from tests import search_fixtures
from tests.search_fixtures import CONFIG, NUM_VIDEOS, run_cli, save_checkpoint

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install faiss-cpu)")


def index_cli(world, videos, index_dir, capsys, *extra):
    return run_cli(["index", videos, "--index", index_dir, *world.model_args(), "--workers", 0,
                    "--precision", "fp32", "--no_progress", *extra], capsys)


def as_dict(index: VideoIndex) -> dict:
    feats = index.features()
    return {e["path"]: (e, feats[i]) for i, e in enumerate(index.entries)}


# ------------------------------------------------------------------------------------ round trip
def test_index_query_round_trip(world, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    code, out, err = index_cli(world, world.videos, idx, capsys, "--shard_size", 4, "--batch_size", 2)
    assert code == 0, err
    assert f"{NUM_VIDEOS} entries of {NUM_VIDEOS} videos (--segments auto" in out and "in 2 shard(s)" in out
    index = VideoIndex.open(idx)
    assert len(index) == NUM_VIDEOS
    entry = index.entries[0]
    assert {"path", "size", "mtime_ns", "duration", "num_frames", "fps", "frames_used"} <= set(entry)
    assert len(entry["frames_used"]) == CONFIG["max_frames"] and entry["fps"] == 3.0
    assert entry["start"] is None and entry["end"] is None and entry["segment"] == [0, 1]  # short files: whole
    assert entry["duration"] == pytest.approx(entry["num_frames"] / 3.0, abs=1e-3)
    meta = json.load(open(os.path.join(idx, "index.json")))
    assert meta["model"]["dgl_config"]["shared_latent_space"] == "linear"   # read from the checkpoint
    assert meta["model"]["checkpoint"] == os.path.abspath(world.checkpoint)

    # Stored features are the model's evaluation features of each file.
    from dataloaders.video import load_video
    path = entry["path"]
    video, mask, _ = load_video(path, CONFIG["max_frames"], 32, train=False)
    model = world.model().model
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_video(video[None], mask[None]), dim=-1)
    torch.testing.assert_close(index.features()[0:1], expected, atol=1e-5, rtol=1e-5)

    # A video's own frames as the query (a copy at another path, so it is encoded anew): itself first.
    query_video = tmp_path / "query.mp4"
    target = index.entries[3]["path"]
    shutil.copy(target, query_video)
    code, out, err = run_cli(["query", "--video", query_video, "--index", idx, "-k", 3, "--json", "-",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    results = json.loads(out)[0]["results"]
    assert results[0]["path"] == target and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(results) == 3 and results[0]["score"] >= results[1]["score"] >= results[2]["score"]

    # Text queries: table + JSON file; the model comes from the index record.
    code, out, err = run_cli(["query", "a red square moves left then up", "the blue circle", "--index", idx,
                              "-k", 2, "--json", tmp_path / "r.json", "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.count("query: ") == 2 and "rank" in out
    data = json.load(open(tmp_path / "r.json"))
    assert [len(d["results"]) for d in data] == [2, 2]
    (tmp_path / "queries.txt").write_text("a red square moves left then up\n\nthe blue circle\n")
    code, out, err = run_cli(["query", "--queries_file", tmp_path / "queries.txt", "--index", idx, "-k", 2,
                              "--json", "-", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out) == data  # blank lines skipped; the same results as the arguments gave
    # The scores are the cosine similarities of the model's text and video features.
    hits = index_with_model(idx, world).search(["the blue circle"], k=NUM_VIDEOS)[0]
    text = index_with_model(idx, world).encode_texts(["the blue circle"])
    feats = as_dict(index)
    for h in hits:
        assert h.score == pytest.approx(float(text[0] @ feats[h.path][1]), abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def index_with_model(idx, world):
    m = world.model()
    return VideoIndex.open(idx, model=m.model, tokenizer=m.tokenizer)


def test_python_api_in_memory(world, loaded):
    index = VideoIndex.build(loaded.model, [world.videos], tokenizer=loaded.tokenizer, precision="fp32",
                             workers=1, log=None)  # a decoding worker process
    assert len(index) == NUM_VIDEOS and index.root is None
    hits = index.search(["a red square moves left then up", "a green triangle"], k=3)
    assert len(hits) == 2 and all(len(h) == 3 for h in hits)
    own = index.search_video(index.entries[2]["path"], k=1)
    assert own[0].path == index.entries[2]["path"]


# ------------------------------------------------------------------------------------ incremental
def test_incremental_reindex_add_change_delete(world, tmp_path, capsys, loaded):
    videos = world.copy_videos(str(tmp_path / "videos"))
    idx = str(tmp_path / "idx")
    assert index_cli(world, videos, idx, capsys, "--shard_size", 2)[0] == 0
    before = as_dict(VideoIndex.open(idx))
    names = sorted(before)

    added = os.path.join(videos, "more", "added.mp4")
    shutil.copy(names[0], added)
    deleted = names[1]
    os.remove(deleted)
    changed = names[2]
    shutil.copy(names[3], changed)  # new content, size and time
    calls = []
    real_encode = VideoIndex._encode

    def spy(self, files, *a, **kw):
        calls.append(list(files))
        return real_encode(self, files, *a, **kw)

    VideoIndex._encode = spy
    try:
        code, out, err = index_cli(world, videos, idx, capsys, "--shard_size", 2)
    finally:
        VideoIndex._encode = real_encode
    assert code == 0, err
    assert sorted(calls[0]) == sorted([added, changed])          # only the new and the changed file
    after = as_dict(VideoIndex.open(idx))
    assert deleted not in after and added in after and set(after) == set(before) - {deleted} | {added}
    for p in set(before) - {deleted, changed}:
        assert torch.equal(after[p][1], before[p][1])              # untouched entries kept as they were
    torch.testing.assert_close(after[changed][1], before[names[3]][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(after[added][1], before[names[0]][1], atol=1e-5, rtol=0)
    # Nothing changed: nothing encoded, same index.
    assert index_cli(world, videos, idx, capsys)[0] == 0
    again = as_dict(VideoIndex.open(idx))
    assert set(again) == set(after) and all(torch.equal(again[p][1], after[p][1]) for p in after)
    # Another folder into the same index adds to it; the first folder's entries stay.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(names[0], other / "extra.mp4")
    assert index_cli(world, other, idx, capsys)[0] == 0
    more = as_dict(VideoIndex.open(idx))
    assert set(more) == set(after) | {str(other / "extra.mp4")}


def test_killed_run_resumes_to_the_same_index(world, tmp_path, loaded):
    full = VideoIndex.build(loaded.model, [world.videos], index_dir=str(tmp_path / "full"), precision="fp32",
                            shard_size=2, batch_size=2, log=None)

    class Killed(Exception):
        pass

    def kill_after_first_shard(path):
        raise Killed(path)

    with pytest.raises(Killed):
        VideoIndex.build(loaded.model, [world.videos], index_dir=str(tmp_path / "resumed"), precision="fp32",
                         shard_size=2, batch_size=2, on_shard=kill_after_first_shard, log=None)
    partial = VideoIndex.open(str(tmp_path / "resumed"))
    assert len(partial) == 2  # the first shard survived
    encoded = []
    resumed = VideoIndex.build(loaded.model, [world.videos], index_dir=str(tmp_path / "resumed"),
                               precision="fp32", shard_size=2, batch_size=2, on_shard=encoded.append, log=None)
    assert len(encoded) == 2  # only the remaining 4 videos, in 2 shards
    a, b = as_dict(full), as_dict(VideoIndex.open(str(tmp_path / "resumed")))
    assert list(a) == list(b)
    for p in a:
        assert a[p][0] == b[p][0] and torch.equal(a[p][1], b[p][1])
    assert len(resumed) == NUM_VIDEOS


@pytest.mark.slow
def test_sigkill_during_indexing_then_resume(world, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    idx = str(tmp_path / "idx")
    cmd = [sys.executable, os.path.join(repo, "search_videos.py"), "index", world.videos, "--index", idx,
           *world.model_args(), "--workers", "0", "--precision", "fp32", "--shard_size", "1", "--batch_size", "1",
           "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = os.path.join(idx, "shards")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(shards) and [f for f in os.listdir(shards) if f.endswith(".npz")]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert 1 <= len(VideoIndex.open(idx)) < NUM_VIDEOS
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run([*cmd[:5], str(tmp_path / "ref"), *cmd[6:]], cwd=repo, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr
    # the reference index times its own kernels (attention backend, fp32 product path), which may round
    # differently from the killed run's recorded ones: equal to rounding here; bit for bit with the kernels
    # fixed in tests/test_index_crash.py
    a, b = as_dict(VideoIndex.open(idx)), as_dict(VideoIndex.open(str(tmp_path / "ref")))
    assert sorted(a) == sorted(b) and all(torch.allclose(a[p][1], b[p][1], atol=1e-5, rtol=0) for p in a)


# ------------------------------------------------------------------------------------ search backends
def test_exact_topk_chunked_equals_full_sort():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(1000, 16, generator=g), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=-1)
    scores, rows = exact_topk(q, [feats[:300], feats[300:301], feats[301:]], k=10, chunk_rows=64)
    full = (q @ feats.t()).topk(10, dim=1)
    assert torch.equal(rows, full.indices) and torch.allclose(scores, full.values)
    s, r = exact_topk(q, [feats[:3]], k=10)
    assert r.shape == (7, 3)


@needs_faiss
def test_faiss_exact_equals_builtin_and_ann_recall(world, tmp_path, loaded, capsys):
    idx = str(tmp_path / "idx")
    assert index_cli(world, world.videos, idx, capsys)[0] == 0
    index = VideoIndex.open(idx, model=loaded.model, tokenizer=loaded.tokenizer)
    texts = ["a red square moves left then up", "the blue circle goes down", "a purple triangle"]
    exact = index.search(texts, k=5, backend="exact")
    flat = index.search(texts, k=5, backend="faiss")
    for e, f in zip(exact, flat):
        assert [h.path for h in e] == [h.path for h in f]
        assert np.allclose([h.score for h in e], [h.score for h in f], atol=1e-5)
    lines = []
    hnsw = index.search(texts, k=5, backend="faiss-hnsw", log=lines.append)
    assert "recall@" in lines[0] and os.path.isfile(os.path.join(idx, "ann-hnsw.faiss"))
    assert [h.path for h in hnsw[0]] == [h.path for h in exact[0]]  # 6 videos: the graph is exhaustive
    # Large random data through the searcher: the recall is measured, flat is exact.
    from retrieval.search import FaissSearcher, recall_at_k
    g = np.random.default_rng(0)
    x = g.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:50] + 0.1 * g.standard_normal((50, 32)).astype(np.float32)
    _, e_rows = exact_topk(torch.from_numpy(q), [torch.from_numpy(x)], 10)
    _, f_rows = FaissSearcher.build(x, "flat").search(q, 10)
    assert recall_at_k(f_rows, e_rows.numpy()) == 1.0
    ivf = FaissSearcher.build(x, "ivf")
    assert 0.3 < recall_at_k(ivf.search(q, 10)[1], e_rows.numpy()) <= 1.0


@needs_faiss
def test_index_builds_the_approximate_search_of_a_large_index_and_query_uses_it(world, tmp_path, capsys,
                                                                                  monkeypatch):
    import retrieval.approximate

    monkeypatch.setattr(retrieval.approximate, "APPROXIMATE_FROM", 1)  # every index is "large"
    idx = str(tmp_path / "idx")
    code, _, err = index_cli(world, world.videos, idx, capsys)
    assert code == 0 and "approximate search built over 6 entries" in err, err
    assert os.path.isfile(os.path.join(idx, "approximate.faiss"))
    base = ["query", "a red square moves left", "--index", idx, "--json", "-", "--device", "cpu"]
    code, out, err = run_cli([*base, "--approximate_from", "1"], capsys)
    assert code == 0 and "approximate search (faiss Flat): recall@5 1.000" in err, err
    assert "building" not in err  # the one index built
    approx = json.loads(out)
    code, out, err = run_cli([*base, "--backend", "exact"], capsys)
    assert code == 0 and "approximate" not in err
    assert json.loads(out) == approx  # 6 entries: the search is exhaustive, the scores exact


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_one_line_each(world, tmp_path, capsys):
    def one_line_error(argv, *needles):
        return search_fixtures.one_line_error(argv, capsys, *needles)

    empty = tmp_path / "empty"
    empty.mkdir()
    idx = tmp_path / "idx"
    common = [*world.model_args(), "--workers", 0, "--no_progress", "--precision", "fp32"]
    one_line_error(["index", empty, "--index", idx, *common], "no video files", str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "junk.avi").write_bytes(b"this is not a video" * 50)
    one_line_error(["index", bad, "--index", tmp_path / "bad_idx", *common], "none of the 2 video files",
                   "could be read")
    one_line_error(["index", tmp_path / "nowhere", "--index", idx, *common], "no such file or folder")

    # A good index, with an unreadable file among good ones: skipped and listed, not fatal.
    videos = world.copy_videos(str(tmp_path / "videos"))
    shutil.copy(bad / "junk.avi", os.path.join(videos, "junk.avi"))
    code, out, err = run_cli(["index", videos, "--index", idx, *common], capsys)
    assert code == 0 and "1 video(s) or range(s) could not be read" in out and "junk.avi" in out
    failed = json.load(open(idx / "failed.json"))
    assert [os.path.basename(f["path"]) for f in failed] == ["junk.avi"] and failed[0]["reason"]

    q = ["--index", idx, "--device", "cpu"]
    one_line_error(["query", "", *q], "query 1 is empty")
    one_line_error(["query", *q], "no query")
    one_line_error(["query", "a red square", "-k", 0, *q], "-k must be at least 1")
    code, out, err = run_cli(["query", "a red square", "-k", 50, *q], capsys)  # k > index: all, with a note
    assert code == 0 and "k=50 is larger than the index (6 entries)" in err and out.count(".mp4") == NUM_VIDEOS
    one_line_error(["query", "a red square", "--index", empty, "--device", "cpu"], "not a video index")

    # Another model (other prompts) against this index: refused, for querying and for indexing.
    other = world.model().model
    with torch.no_grad():
        other.global_prompts.add_(1.0)
    other_ckpt = save_checkpoint(other, str(tmp_path / "other.pth.tar"), world.bpe, CONFIG)
    one_line_error(["query", "a red square", *q, "--clip", world.clip, "--checkpoint", other_ckpt],
                   "built with another model")
    one_line_error(["index", videos, "--index", idx, *world.model_args(other_ckpt), "--workers", 0],
                   "built with another model")
    one_line_error(["query", "x", *q, "--clip", world.clip, "--checkpoint", tmp_path / "missing.pth"],
                   "checkpoint not found")

    # A corrupt shard: one line at query time; re-indexing re-encodes its videos, nothing else is lost.
    shard = sorted((idx / "shards").glob("shard-*.npz"))[0]
    good = as_dict(VideoIndex.open(str(idx)))
    shard.write_bytes(shard.read_bytes()[:100])
    one_line_error(["query", "a red square", *q], "corrupt index shard", shard.name)
    shard.write_bytes(b"not a shard\n")  # numpy would suggest unpickling such a file: the line says what it is
    line = one_line_error(["query", "a red square", *q], "corrupt index shard", shard.name, "not an .npz archive")
    assert "pickle" not in line
    code, out, err = run_cli(["index", videos, "--index", idx, *common], capsys)
    assert code == 0, err
    repaired = as_dict(VideoIndex.open(str(idx)))
    assert set(repaired) == set(good)
    assert all(torch.allclose(repaired[p][1], good[p][1], atol=1e-5) for p in good)

    # A damaged index.json: one line, the shards stay.
    (idx / "index.json").write_text("{not json")
    one_line_error(["query", "a red square", *q], "index.json is unreadable")
    assert len(list((idx / "shards").glob("shard-*.npz"))) >= 1


def test_a_run_that_waited_takes_the_index_it_finds(world, tmp_path, loaded):
    """What a run that waited for the writer lock decides is decided under the lock: with no segmentation
    flags it takes the index another run created meanwhile (not the default of a new index), and kernels
    other than the ones that run recorded are refused in one line, nothing written."""
    from retrieval.index import SearchError
    from retrieval.segments import Segmentation

    idx = str(tmp_path / "idx")
    made_first = Segmentation(mode="windows", window=1.0, stride=1.0)
    first = {"device": "cpu", "attention": "math", "fp32_products": None}
    VideoIndex.build(loaded.model, [world.videos], index_dir=idx, precision="fp32", log=None,
                     segmentation=made_first, kernels=first)
    before = open(os.path.join(idx, "index.json")).read()
    again = VideoIndex.build(loaded.model, [world.videos], index_dir=idx, precision="fp32", log=None,
                             new_index_segmentation=Segmentation(), kernels=first)
    assert again.segmentation.to_dict() == made_first.to_dict()
    assert json.loads(before)["segmentation"] == json.loads(open(os.path.join(idx, "index.json")).read())["segmentation"]
    before = open(os.path.join(idx, "index.json")).read()
    with pytest.raises(SearchError, match="records other kernels"):
        VideoIndex.build(loaded.model, [world.videos], index_dir=idx, precision="fp32", log=None,
                         kernels={**first, "attention": "flash"})
    assert open(os.path.join(idx, "index.json")).read() == before
