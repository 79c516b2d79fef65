"""search_videos.py evaluate: ranks of labelled queries against ranks computed by hand on a small index,
QB-norm with a user's bank, time-range segment matching, and bad input (one line, exit 2, nothing touched)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from modules.qb_norm import qb_norm
from retrieval import VideoIndex
from retrieval.evaluate import best_per_video, match_entries, video_groups
from retrieval.model_io import SearchError
from tests.search_fixtures import run_cli


@pytest.fixture(scope="module")
def index(world, tmp_path_factory):
    loaded = world.model()
    root = str(tmp_path_factory.mktemp("evaluate_index") / "idx")
    VideoIndex.build(loaded.model, [world.videos], index_dir=root, tokenizer=loaded.tokenizer, precision="fp32",
                     model_record=loaded.info, log=lambda *_: None)
    return VideoIndex.open(root, model=loaded.model, tokenizer=loaded.tokenizer)


def relative_video(world, entry) -> str:
    return os.path.relpath(entry["path"], world.videos)


def write_queries(path, rows, header=("query", "video")):
    if str(path).endswith(".jsonl"):
        path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows),
                        encoding="utf-8")
    return path


def hand_ranks(index, texts, relevant_paths):
    """1-based rank of each query's video: 1 + entries scoring higher, + tied entries listed before it."""
    q = index.encode_texts(texts).numpy().astype(np.float64)
    feats = index.features().numpy().astype(np.float64)
    paths = [e["path"] for e in index.entries]
    ranks = []
    for qi, path in enumerate(relevant_paths):
        g = paths.index(path)
        scores = [float(np.dot(q[qi], feats[j]) / np.linalg.norm(q[qi]) / np.linalg.norm(feats[j]))
                  for j in range(len(paths))]
        ranks.append(1 + sum(1 for j, s in enumerate(scores) if s > scores[g] or (s == scores[g] and j < g)))
    return ranks


@pytest.fixture(scope="module")
def labelled(world, index):
    """Two queries per indexed video (a caption of its clip and of the next clip's, so some miss)."""
    entries = index.entries
    by_id = {s.video_id: s for s in world.specs}
    rows = []
    for k, e in enumerate(entries):
        spec = by_id[os.path.splitext(os.path.basename(e["path"]))[0]]
        other = by_id[os.path.splitext(os.path.basename(entries[(k + 1) % len(entries)]["path"]))[0]]
        rows.append((spec.caption(0), relative_video(world, e)))
        rows.append((other.caption(1), relative_video(world, e)))
    return rows


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_ranks_match_a_hand_computation(world, index, labelled, tmp_path, capsys, ext):
    queries = write_queries(tmp_path / f"q{ext}", labelled)
    out_json = tmp_path / "ranks.json"
    code, out, err = run_cli(["evaluate", "--index", index.root, "--queries", queries, "--video_root", world.videos,
                              "--json", out_json, *world.model_args()], capsys)
    assert code == 0, err
    expected = hand_ranks(index, [r[0] for r in labelled], [os.path.join(world.videos, r[1]) for r in labelled])
    data = json.loads(out_json.read_text())
    assert [q["rank"] for q in data["per_query"]] == expected
    assert data["per_query"][3]["row"] == f"q{ext} line {5 if ext == '.csv' else 4}"
    e = np.array(expected)
    m = data["metrics"]
    assert m["R1"] == pytest.approx(100 * np.mean(e <= 1)) and m["R5"] == pytest.approx(100 * np.mean(e <= 5))
    assert m["median_rank"] == pytest.approx(np.median(e)) and m["mean_rank"] == pytest.approx(e.mean())
    assert f"R@1 {100 * np.mean(e <= 1):.1f}" in out and f"median rank {np.median(e):g}" in out
    assert 1 < max(expected)  # not a trivial case: some queries miss


def test_qb_norm_with_a_user_bank(world, index, labelled, tmp_path, capsys):
    queries = write_queries(tmp_path / "q.csv", labelled)
    bank_texts = [s.caption(2) for s in world.specs] + [s.caption(0) + " again" for s in world.specs]
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(bank_texts) + "\n", encoding="utf-8")
    out_json = tmp_path / "qb.json"
    args = ["evaluate", "--index", index.root, "--queries", queries, "--video_root", world.videos,
            *world.model_args()]
    code, out, err = run_cli([*args, "--qb_norm", bank, "--qb_theta", 1, "--qb_beta", 20, "--json", out_json],
                             capsys)
    assert code == 0, err
    # by hand: QB-norm of the (queries x entries) scores with the (bank x entries) scores, 100 x cosine
    scale = float(index.model.clip.logit_scale.exp())
    feats = index.features().numpy()
    q = index.encode_texts([r[0] for r in labelled]).numpy()
    b = index.encode_texts(bank_texts).numpy()
    normed = qb_norm((scale * b @ feats.T).astype(np.float32), (scale * q @ feats.T).astype(np.float32), 1, 20.0, 1)
    paths = [e["path"] for e in index.entries]
    gt = [paths.index(os.path.join(world.videos, r[1])) for r in labelled]
    expected = [1 + int(np.sum(row > row[g]) + np.sum(row[:g] == row[g])) for row, g in zip(normed, gt)]
    data = json.loads(out_json.read_text())
    assert [p["rank_qb_norm"] for p in data["per_query"]] == expected
    # and the normalised score of each query's video (a wrong beta or theta that keeps the ranks shows here)
    np.testing.assert_allclose([p["score_qb_norm"] for p in data["per_query"]],
                               [row[g] for row, g in zip(normed, gt)], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([p["score"] for p in data["per_query"]],
                               [float(q[i] @ feats[g]) for i, g in enumerate(gt)], atol=1e-5)
    assert data["qb_norm"]["bank_size"] == len(bank_texts) and "with QB-norm (bank of 12" in out
    assert expected != [p["rank"] for p in data["per_query"]]  # the normalisation changed something

    # the evaluated queries as the bank: refused, as texts and as their features
    same = tmp_path / "same.txt"
    same.write_text("\n".join(r[0] for r in labelled) + "\n", encoding="utf-8")
    code, _, err = run_cli([*args, "--qb_norm", same], capsys)
    assert code == 2 and "same.txt line 1: the bank holds every evaluated query" in err
    np.save(tmp_path / "same.npy", q)
    code, _, err = run_cli([*args, "--qb_norm", tmp_path / "same.npy"], capsys)
    assert code == 2 and "same.npy row 1: the bank holds every evaluated query" in err
    assert "this row has the features of the query of q.csv line 2" in err


@pytest.mark.parametrize("spelling", [str.upper, lambda t: t + ".", lambda t: "  " + t.capitalize() + " !"],
                         ids=["upper case", "full stop", "spacing and punctuation"])
def test_qb_norm_bank_of_the_queries_respelt_is_refused(world, index, labelled, tmp_path, capsys, spelling):
    """The bank check compares what the model reads (token ids after CLIP's cleaning, punctuation aside),
    not strings: the evaluated queries in upper case or with a full stop are the same queries."""
    queries = write_queries(tmp_path / "q.csv", labelled)
    args = ["evaluate", "--index", index.root, "--queries", queries, "--video_root", world.videos,
            *world.model_args()]
    other = [s.caption(2) for s in world.specs]
    bank = write_queries(tmp_path / "bank.csv", [(t, "x.mp4") for t in other + [spelling(r[0]) for r in labelled]],
                         header=("caption", "video"))
    before = tmp_path / "ranks.json"
    before.write_text("earlier\n")
    code, out, err = run_cli([*args, "--qb_norm", bank, "--json", before], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    line = len(other) + 2  # the first respelt query, after the header and the other captions
    assert f"--qb_norm bank.csv line {line}: the bank holds every evaluated query of {queries}" in err
    assert "of the query of q.csv line 2" in err and before.read_text() == "earlier\n"
    # some of them: evaluated, with a note naming the first such row
    some = tmp_path / "some.txt"
    some.write_text("\n".join(other + [spelling(labelled[3][0])]) + "\n", encoding="utf-8")
    code, out, err = run_cli([*args, "--qb_norm", some], capsys)
    assert code == 0, err
    assert (f"note: 1 query bank rows are also evaluated queries as the model reads them (e.g. --qb_norm some.txt "
            f"line {len(other) + 1} is q.csv line 5)") in out


def test_text_as_read_tells_apart_what_the_model_tells_apart(world):
    from modules.tokenizer import get_tokenizer, text_as_read, token_ids

    tok = get_tokenizer(bpe_path=world.bpe)
    key = lambda t, n=32: text_as_read(tok, t, n)  # noqa: E731
    base = world.specs[0].caption(0)
    assert key(base) == key(base.upper()) == key(base + ".") == key(f" {base.capitalize()} , ! ") != ()
    assert key(base) != key(base + " again") and key(base) != key(world.specs[1].caption(0))
    assert key(base.replace(" ", " , ", 1)) == key(base)
    # cut where the model cuts: words past max_words - 2 tokens are not read
    n = len(token_ids(tok, base, 64))
    assert key(base, n) == key(base + " again", n) and key(base, n + 1) != key(base + " again", n + 1)


def test_segments_are_matched_by_path_and_span():
    entries = [{"path": "/v/long.mp4", "start": 0.0, "end": 4.0}, {"path": "/v/long.mp4", "start": 4.0, "end": 8.0},
               {"path": "/v/short.mp4"}]
    queries = [{"line": "line 2", "video": "long.mp4", "path": "/v/long.mp4", "start": 4.0, "end": 8.0},
               {"line": "line 3", "video": "short.mp4", "path": "/v/short.mp4", "start": None, "end": None},
               {"line": "line 4", "video": "long.mp4", "path": "/v/long.mp4", "start": 0.0, "end": 4.0004}]
    assert match_entries(queries, entries, "q.csv", "idx") == [1, 2, 0]
    with pytest.raises(SearchError, match=r"q.csv line 5 column 'start': the span 2-6 s of long.mp4 is not in the "
                                          r"index \(its segments are 0-4, 4-8 s\)"):
        match_entries([{"line": "line 5", "video": "long.mp4", "path": "/v/long.mp4", "start": 2.0, "end": 6.0}],
                      entries, "q.csv", "idx")
    # a frame-accurate range late in a long file: the span the refusal lists is one a query can copy
    late = [{"id": "long.mp4#1", "path": "/v/long.mp4", "start": 1234.566667, "end": 1236.4}]
    with pytest.raises(SearchError, match=r"its segments are 1234\.566667-1236\.4 s"):
        match_entries([{"line": "line 6", "video": "long.mp4", "path": "/v/long.mp4", "start": 1234.0, "end": 1236.4}],
                      late, "q.csv", "idx")
    with pytest.raises(SearchError, match=r"q.csv line 6 column 'video': the index holds long.mp4 only as "
                                          r"time-range segments"):
        match_entries([{"line": "line 6", "video": "long.mp4", "path": "/v/long.mp4", "start": None, "end": None}],
                      entries, "q.csv", "idx")


def test_a_span_matches_a_segment_by_both_ends():
    """A span that shares only its start or only its end with a segment is not that segment: refused."""
    entries = [{"path": "/v/long.mp4", "start": 0.0, "end": 4.0}, {"path": "/v/long.mp4", "start": 4.0, "end": 8.0}]
    for start, end in ((0.0, 6.0), (4.0, 4.5), (2.0, 8.0), (1.0, 4.0)):
        query = {"line": "line 2", "video": "long.mp4", "path": "/v/long.mp4", "start": start, "end": end}
        with pytest.raises(SearchError, match=rf"the span {start:g}-{end:g} s of long.mp4 is not in the index"):
            match_entries([query], entries, "q.csv", "idx")


def test_files_scored_by_their_best_entry_by_hand():
    entries = [{"path": "/v/a.mp4", "start": 0.0, "end": 2.0}, {"path": "/v/b.mp4"},
               {"path": "/v/a.mp4", "start": 2.0, "end": 4.0}, {"path": "/v/c.mp4", "start": 0.0, "end": 2.0}]
    files, groups = video_groups(entries)
    assert files == ["/v/a.mp4", "/v/b.mp4", "/v/c.mp4"] and groups.tolist() == [0, 1, 0, 2]
    scores = np.array([[0.1, 0.5, 0.7, 0.2],
                       [0.4, 0.3, 0.4, 0.9]])
    best, where = best_per_video(scores, groups)
    np.testing.assert_array_equal(best, [[0.7, 0.5, 0.2], [0.4, 0.3, 0.9]])
    assert where.tolist() == [[2, 1, 3], [0, 1, 3]]  # a tie keeps the first entry
    # a file without a finite score keeps -inf and names its own first entry, not another file's
    best, where = best_per_video(np.array([[np.nan, 0.5, np.nan, np.nan]]), groups)
    assert best[0, 0] == best[0, 2] == -np.inf and where.tolist() == [[0, 1, 3]]


def test_by_video_ranks_files_by_their_best_segment(world, tmp_path, capsys):
    """A windowed index: whole-file queries are refused without --by_video (the message says so) and ranked
    with it, each file scored by its best window, as computed here by hand."""
    from retrieval.segments import Segmentation

    loaded = world.model()
    root = str(tmp_path / "windows")
    VideoIndex.build(loaded.model, [world.videos], index_dir=root, tokenizer=loaded.tokenizer, precision="fp32",
                     model_record=loaded.info, log=lambda *_: None, segmentation=Segmentation(mode="windows",
                                                                                             window=2, stride=2))
    index = VideoIndex.open(root, model=loaded.model, tokenizer=loaded.tokenizer)
    paths = [e["path"] for e in index.entries]
    files = list(dict.fromkeys(paths))
    assert len(paths) > len(files)  # some files are cut into several windows
    by_id = {s.video_id: s for s in world.specs}
    rows = []
    for k, path in enumerate(files):  # each file's caption, and the next file's (so some miss)
        spec = by_id[os.path.splitext(os.path.basename(path))[0]]
        other = by_id[os.path.splitext(os.path.basename(files[(k + 1) % len(files)]))[0]]
        rows += [(spec.caption(0), os.path.relpath(path, world.videos)),
                 (other.caption(1), os.path.relpath(path, world.videos))]
    queries = write_queries(tmp_path / "q.csv", rows)
    args = ["evaluate", "--index", root, "--queries", queries, "--video_root", world.videos, *world.model_args()]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "only as time-range segments" in err and "--by_video" in err, err
    out_json = tmp_path / "ranks.json"
    code, out, err = run_cli([*args, "--by_video", "--json", out_json], capsys)
    assert code == 0, err
    assert f"({len(files)} files, each scored by its best of {len(paths)} entries)" in out
    q = index.encode_texts([r[0] for r in rows]).numpy().astype(np.float64)
    feats = index.features().numpy().astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (feats / np.linalg.norm(feats, axis=1, keepdims=True)).T
    expected, best_span = [], []
    for i, (_, video) in enumerate(rows):
        file_scores = [max(cos[i, j] for j in range(len(paths)) if paths[j] == f) for f in files]
        g = files.index(os.path.join(world.videos, video))
        expected.append(1 + sum(1 for j, s in enumerate(file_scores)
                                if s > file_scores[g] or (s == file_scores[g] and j < g)))
        j = max((j for j in range(len(paths)) if paths[j] == files[g]), key=lambda j: (cos[i, j], -j))
        best_span.append((index.entries[j]["start"], index.entries[j]["end"], cos[i, j]))
    data = json.loads(out_json.read_text())
    assert [p["rank"] for p in data["per_query"]] == expected
    assert 1 < max(expected)  # some queries miss
    for p, (start, end, score) in zip(data["per_query"], best_span):
        assert (p["best_start"], p["best_end"]) == (start, end) and p["score"] == pytest.approx(score, abs=1e-5)
    assert data["metrics"]["R1"] == pytest.approx(100 * np.mean(np.array(expected) <= 1))
    assert data["ranks"].startswith("1-based position of the query's file among all indexed files")
    # with QB-norm: each file scored by its best normalised entry
    bank_texts = [s.caption(2) for s in world.specs]
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(bank_texts) + "\n", encoding="utf-8")
    code, out, err = run_cli([*args, "--by_video", "--qb_norm", bank, "--qb_theta", 1, "--qb_beta", 20, "--json",
                              out_json], capsys)
    assert code == 0, err
    scale = float(index.model.clip.logit_scale.exp())
    b = index.encode_texts(bank_texts).numpy()
    f32 = index.features().numpy()
    normed = qb_norm((scale * b @ f32.T).astype(np.float32),
                     (scale * index.encode_texts([r[0] for r in rows]).numpy() @ f32.T).astype(np.float32), 1, 20.0, 1)
    qb_expected = []
    for i, (_, video) in enumerate(rows):
        file_scores = [max(normed[i, j] for j in range(len(paths)) if paths[j] == f) for f in files]
        g = files.index(os.path.join(world.videos, video))
        qb_expected.append(1 + sum(1 for j, s in enumerate(file_scores)
                                   if s > file_scores[g] or (s == file_scores[g] and j < g)))
    per_query = json.loads(out_json.read_text())["per_query"]
    assert [p["rank_qb_norm"] for p in per_query] == qb_expected
    for i, ((_, video), p) in enumerate(zip(rows, per_query)):  # the segment that won after QB-norm
        g = os.path.join(world.videos, video)
        j = max((j for j in range(len(paths)) if paths[j] == g), key=lambda j: (normed[i, j], -j))
        assert (p["best_start_qb_norm"], p["best_end_qb_norm"]) == (index.entries[j]["start"], index.entries[j]["end"])


BAD_QUERIES = [
    ("missing column", "text,video\nhello,a.mp4\n", "q.csv line 1: missing column 'query' (or 'caption')"),
    ("empty query", "query,video\n,{video}\n", "q.csv line 2 column 'query': empty value"),
    ("unknown video", "query,video\nhello,nothere.mp4\n", "q.csv line 2 column 'video':"),
    ("bad start", "query,video,start,end\nhello,{video},soon,4\n", "q.csv line 2 column 'start': 'soon' is not a number"),
    ("start after end", "query,video,start,end\nhello,{video},5,4\n", "q.csv line 2 column 'start': 5 is not before"),
]


@pytest.mark.parametrize("name,text,message", BAD_QUERIES, ids=[b[0] for b in BAD_QUERIES])
def test_bad_queries_one_line_and_the_earlier_json_untouched(world, index, labelled, tmp_path, capsys, name, text,
                                                             message):
    out_json = tmp_path / "ranks.json"
    out_json.write_text('{"earlier": 1}\n')
    queries = tmp_path / "q.csv"
    queries.write_text(text.format(video=labelled[0][1]), encoding="utf-8")
    code, _, err = run_cli(["evaluate", "--index", index.root, "--queries", queries, "--video_root", world.videos,
                            "--json", out_json, *world.model_args()], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert out_json.read_text() == '{"earlier": 1}\n'


def test_queries_file_extension_and_encoding(world, index, tmp_path, capsys):
    args = ["--index", index.root, "--video_root", world.videos, *world.model_args()]
    (tmp_path / "q.xlsx").write_text("query,video\n")
    code, _, err = run_cli(["evaluate", "--queries", tmp_path / "q.xlsx", *args], capsys)
    assert code == 2 and "unknown annotation file extension '.xlsx'" in err
    (tmp_path / "l.csv").write_bytes("query,video\ncaf\u00e9,a.mp4\n".encode("latin-1"))
    code, _, err = run_cli(["evaluate", "--queries", tmp_path / "l.csv", *args], capsys)
    assert code == 2 and "l.csv line 2: not UTF-8" in err


def test_queries_match_their_file_whatever_the_spelling(world, index, tmp_path, capsys):
    """Relative, ./relative, absolute and a link to the file name one indexed video; the queries of one
    video are not next to each other, and each is ranked against its own row's video."""
    entries = index.entries[:3]
    os.symlink(entries[2]["path"], tmp_path / "link.mp4")
    by_id = {s.video_id: s for s in world.specs}
    rows, truth = [], []
    for turn in range(3):
        for k, e in enumerate(entries):
            rel = relative_video(world, e)
            spelling = [rel, "./" + rel, e["path"]][(turn + k) % 3]
            if (turn, k) == (2, 2):
                spelling = str(tmp_path / "link.mp4")
            spec = by_id[os.path.splitext(os.path.basename(e["path"]))[0]]
            rows.append((spec.caption(turn), spelling))
            truth.append(e["path"])
    queries = write_queries(tmp_path / "q.csv", rows)
    expected = hand_ranks(index, [r[0] for r in rows], truth)
    for extra in ([], ["--by_video"]):  # one entry per file: files rank as entries do
        out_json = tmp_path / f"ranks{len(extra)}.json"
        code, _, err = run_cli(["evaluate", "--index", index.root, "--queries", queries, "--video_root",
                                world.videos, "--json", out_json, *extra, *world.model_args()], capsys)
        assert code == 0, err
        per_query = json.loads(out_json.read_text())["per_query"]
        assert [q["rank"] for q in per_query] == expected


def test_entries_indexed_through_a_link_match_the_real_file(tmp_path):
    """An index built from a linked folder records the link's paths; a query naming the real file (or
    another spelling) is that entry, and --by_video counts one file."""
    from retrieval.evaluate import match_videos, read_queries

    real = tmp_path / "real"
    real.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (real / name).write_bytes(b"x")
    os.symlink(real, tmp_path / "linked")
    entries = [{"path": str(tmp_path / "linked" / "a.mp4")}, {"path": str(tmp_path / "linked" / "b.mp4")},
               {"path": str(real / "a.mp4"), "start": 0.0, "end": 4.0}]
    queries = read_queries(str(write_queries(tmp_path / "q.csv", [("one", "real/b.mp4"), ("two", str(real / "a.mp4")),
                                                                   ("three", "./linked/a.mp4")])), str(tmp_path))
    assert match_entries(queries, entries, "q.csv", "idx") == [1, 0, 0]
    files, groups = video_groups(entries)
    assert groups.tolist() == [0, 1, 0] and match_videos(queries, files, "q.csv", "idx") == [1, 0, 0]


def test_a_repeated_query_row_is_counted_once(world, index, labelled, tmp_path, capsys):
    rows = labelled[:3] + [(labelled[1][0], "./" + labelled[1][1])]  # row 5 repeats row 3, spelt otherwise
    queries = write_queries(tmp_path / "q.csv", rows)
    out_json = tmp_path / "ranks.json"
    code, out, err = run_cli(["evaluate", "--index", index.root, "--queries", queries, "--video_root", world.videos,
                              "--json", out_json, *world.model_args()], capsys)
    assert code == 0, err
    assert "note: 1 row(s) of" in out and "q.csv line 5" in out
    data = json.loads(out_json.read_text())
    assert data["metrics"]["queries"] == 3 and [q["row"] for q in data["per_query"]] == [
        "q.csv line 2", "q.csv line 3", "q.csv line 4"]
