"""``search_videos.py evaluate``: retrieval metrics of an index on the user's own labelled queries.

    python search_videos.py evaluate --index IDX --queries FILE [--video_root DIR] [--qb_norm BANK]
                                     [--by_video] [--json ranks.json]

FILE (``.csv``, ``.tsv`` or ``.jsonl``, UTF-8): a ``query`` column (or ``caption``, so that a test
annotation file of ``--datatype custom`` is a queries file) and the relevant ``video``; with ``start`` and
``end`` (seconds) when the index holds time-range segments. A relative ``video`` is taken relative to
``--video_root`` (default: the current folder, as ``index`` takes its arguments) and matched to the
index entry of that absolute path (and, with start/end, to the entry of that segment).

Every query is ranked against every entry of the index by cosine similarity (exact); its rank is the
1-based position of its video in that order, ties placed as :func:`modules.metrics.compute_ranks` places
them. ``--by_video`` ranks the indexed files instead, each scored by its best entry (a long recording cut
into shots or windows scores as its best segment); the queries then need only ``video``, and a ``start`` /
``end`` they give is not used. Printed: R@1/5/10 (percent of queries with rank <= k), median and mean rank. ``--json`` writes the
metrics and, per query, its rank and its score with its video (cosine; after QB-norm, main.py's scale)
(atomically).

``--qb_norm BANK``: query-bank normalisation (:mod:`modules.qb_norm`) with a bank of OTHER queries the
user supplies: a text file (one query per line), a .csv/.tsv/.jsonl with a ``query`` or ``caption``
column, or precomputed text features (``.npy``, (n, D)). A bank that holds every evaluated query is refused
(one line naming a bank row), one that holds some of them is reported: texts are compared as the model
reads them (:func:`modules.tokenizer.text_as_read`: case, spacing and punctuation aside), features by
direction.
Scores are on main.py's scale (the model's logit scale times the cosine), so ``--qb_beta`` means what it
means for ``search_for_best_r1_with_qb_norm.py``.
"""
from __future__ import annotations

import json
import os

import numpy as np

from runtime.errors import first_line

QUERY_COLUMNS = ("query", "caption")
TIME_TOLERANCE = 1e-3  # seconds: a query's start/end equal an entry's up to this


def add_evaluate_parser(sub, add_model_flags) -> None:
    """The ``evaluate`` subcommand of search_videos.py (``add_model_flags``: the CLI's model flag group)."""
    from runtime.errors import finite_float

    e = sub.add_parser("evaluate", help="R@1/5/10 and ranks of labelled queries (query, video[, start, end])")
    e.add_argument("--index", required=True)
    e.add_argument("--queries", required=True, help=".csv, .tsv or .jsonl: query (or caption), video[, start, end]")
    e.add_argument("--video_root", default=None,
                   help="folder that relative 'video' paths are relative to (default: the current folder)")
    e.add_argument("--qb_norm", default=None,
                   help="query bank for QB-norm: other queries (.txt one per line, .csv/.tsv/.jsonl) or their "
                        "text features (.npy); never the evaluated queries")
    e.add_argument("--qb_k", type=int, default=1, help="QB-norm: top-k of the bank that activates an entry")
    e.add_argument("--qb_theta", type=finite_float, default=3, help="QB-norm: bank queries needed to activate an entry")
    e.add_argument("--qb_beta", type=finite_float, default=0.87, help="QB-norm: exp(beta * score)")
    e.add_argument("--by_video", action="store_true",
                   help="rank the indexed files, each scored by its best entry (segment), instead of the entries")
    e.add_argument("--json", default=None, help="write the metrics and per-query ranks to this JSON file")
    add_model_flags(e, required=False)


def _search_error(message: str):
    from retrieval.model_io import SearchError

    return SearchError(message)


# ------------------------------------------------------------------------------------------ queries
def read_queries(path: str, video_root: str | None = None, repeats: list | None = None) -> list[dict]:
    """Rows of the queries file: dict(where, query, video, path (canonical), start, end). A row that repeats
    an earlier one (same query, file and span) is left out (as ``--datatype custom`` leaves it out) and
    its place appended to ``repeats``."""
    from dataloaders.base import AnnotationError
    from dataloaders.custom import read_table, row_span, video_file

    try:
        header_probe = read_table(path, required=("video",))
    except AnnotationError as exc:
        raise _search_error(str(exc)) from None
    column = next((c for c in QUERY_COLUMNS if any(c in row for _, row in header_probe)), None)
    if column is None:
        raise _search_error(f"{path} line 1: missing column 'query' (or 'caption')")
    root = os.path.abspath(video_root) if video_root else os.getcwd()
    queries, seen = [], set()
    for where, row in header_probe:
        line = where.split(" ", 1)[1]
        text = row.get(column)
        if not text:
            raise _search_error(f"{path} {line} column '{column}': empty value")
        try:
            start, end = row_span(path, line, row)
        except AnnotationError as exc:
            raise _search_error(str(exc)) from None
        video = row["video"]
        full = video_file(video, root)  # canonical: every spelling of one file matches its entries
        if (text, full, start, end) in seen:
            if repeats is not None:
                repeats.append(where)
            continue
        seen.add((text, full, start, end))
        queries.append({"where": where, "line": line, "query": text, "video": video, "path": full,
                        "start": start, "end": end})
    return queries


def _not_indexed(q: dict, queries_path: str, index_dir: str):
    return _search_error(f"{queries_path} {q['line']} column 'video': {q['path']} is not in the index "
                         f"{index_dir} (index it, or fix the path / --video_root)")


def _entry_files(entries: list[dict]) -> list[str]:
    """The canonical path (``dataloaders.custom.video_file``) of each entry's file, as queries' paths are."""
    from dataloaders.custom import video_file

    known: dict[str, str] = {}
    for e in entries:
        if e["path"] not in known:
            known[e["path"]] = video_file(e["path"], "")
    return [known[e["path"]] for e in entries]


def _same_time(a, b) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) <= TIME_TOLERANCE


def _seconds_text(seconds: float) -> str:
    """A time as short as it prints and still matches (frame-accurate ranges have times like 1234.566667)."""
    short = f"{seconds:g}"
    return short if _same_time(float(short), seconds) else repr(seconds)


def match_entries(queries: list[dict], entries: list[dict], queries_path: str, index_dir: str) -> list[int]:
    """The index row of each query's relevant video: the entry of that path (whole-file entries carry no
    start/end) or, for a query with start/end, the segment entry of that path and span."""
    by_path: dict[str, list[int]] = {}
    for row, file in enumerate(_entry_files(entries)):
        by_path.setdefault(file, []).append(row)
    rows = []
    for q in queries:
        candidates = by_path.get(q["path"], [])
        if not candidates:
            raise _not_indexed(q, queries_path, index_dir)
        if q["start"] is None:
            whole = [r for r in candidates if entries[r].get("start") is None]
            if not whole:
                raise _search_error(f"{queries_path} {q['line']} column 'video': the index holds {q['video']} only "
                                    "as time-range segments; give the query's start and end, or pass --by_video "
                                    "to rank whole files by their best segment")
            rows.append(whole[0])
            continue
        span = [r for r in candidates if _same_time(entries[r].get("start"), q["start"])
                and _same_time(entries[r].get("end"), q["end"])]
        if not span:
            held = [f"{_seconds_text(entries[r]['start'])}-{_seconds_text(entries[r]['end'])}" for r in candidates
                    if entries[r].get("start") is not None]
            what = f"its segments are {', '.join(held[:5])} s" if held else "it is indexed as a whole file only"
            raise _search_error(f"{queries_path} {q['line']} column 'start': the span {q['start']:g}-{q['end']:g} s "
                                f"of {q['video']} is not in the index ({what})")
        rows.append(span[0])
    return rows


def video_groups(entries: list[dict]) -> tuple[list[str], np.ndarray]:
    """The indexed files (canonical paths, in the order of their first entry) and each entry's file number."""
    files: dict[str, int] = {}
    groups = np.array([files.setdefault(f, len(files)) for f in _entry_files(entries)], dtype=np.int64)
    return list(files), groups


def match_videos(queries: list[dict], files: list[str], queries_path: str, index_dir: str) -> list[int]:
    """The file number (in ``files``) of each query's video."""
    number = {path: i for i, path in enumerate(files)}
    rows = []
    for q in queries:
        if q["path"] not in number:
            raise _not_indexed(q, queries_path, index_dir)
        rows.append(number[q["path"]])
    return rows


def best_per_video(scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(queries x files) best score of each file's entries, and the entry (row of ``scores``' columns) that
    gave it (the first one on a tie). ``groups``: each entry's file number, 0.. as :func:`video_groups`
    numbers them."""
    num_files = int(groups.max()) + 1 if len(groups) else 0
    best = np.full((scores.shape[0], num_files), -np.inf, dtype=scores.dtype)
    first = np.unique(groups, return_index=True)[1]  # each file's first entry
    where = np.tile(first, (scores.shape[0], 1))  # a file none of whose scores is a number keeps it
    for entry in range(scores.shape[1]):  # entries in index order: a later tie does not replace the first
        column, f = scores[:, entry], groups[entry]
        better = column > best[:, f]
        best[better, f] = column[better]
        where[better, f] = entry
    return best, where


# ------------------------------------------------------------------------------------------ query bank
def read_bank(path: str):
    """The QB-norm bank: a list of texts, or an (n, D) float array of text features."""
    if not os.path.isfile(path):
        raise _search_error(f"--qb_norm query bank not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            feats = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise _search_error(f"--qb_norm {path}: not a readable .npy array ({first_line(exc)})") from None
        if feats.ndim != 2 or feats.shape[0] == 0 or not np.issubdtype(feats.dtype, np.floating):
            raise _search_error(f"--qb_norm {path}: expected float text features (n, D), got {feats.dtype} "
                                f"{feats.shape}")
        return feats.astype(np.float32)
    if ext in (".csv", ".tsv", ".jsonl"):
        from dataloaders.base import AnnotationError
        from dataloaders.custom import read_table

        try:
            rows = read_table(path, required=())
        except AnnotationError as exc:
            raise _search_error(f"--qb_norm {exc}") from None
        column = next((c for c in QUERY_COLUMNS if any(c in row for _, row in rows)), None)
        if column is None:
            raise _search_error(f"--qb_norm {path} line 1: missing column 'query' (or 'caption')")
        found = [(where, row.get(column)) for where, row in rows if row.get(column)]
    else:
        from dataloaders.base import AnnotationError, read_text

        try:
            lines = read_text(path, "query bank").split("\n")
        except AnnotationError as exc:
            raise _search_error(f"--qb_norm {exc}") from None
        name = os.path.basename(path)
        found = [(f"{name} line {n}", t.strip()) for n, t in enumerate(lines, 1) if t.strip()]
    if not found:
        raise _search_error(f"--qb_norm {path}: the query bank is empty")
    return BankTexts([text for _, text in found], [where for where, _ in found])


class BankTexts(list):
    """The bank's texts, and where each one is in its file (``where[i]``, e.g. "bank.csv line 3")."""

    def __init__(self, texts, where):
        super().__init__(texts)
        self.where = list(where)


def _where(bank, row: int, bank_path: str = "") -> str:
    if isinstance(bank, BankTexts):
        return bank.where[row]
    return f"{os.path.basename(bank_path)} row {row + 1}" if bank_path else f"row {row + 1}"


def bank_queries(bank, texts: list[str], query_feats: np.ndarray, bank_feats: np.ndarray, index) -> dict:
    """:func:`modules.qb_norm.bank_overlap` of the bank and the evaluated queries as the model reads them:
    texts by their token ids (:func:`modules.tokenizer.text_as_read`: case, spacing and punctuation aside),
    features (a .npy bank) by being the same direction (cosine above 1 - 1e-4)."""
    from modules.qb_norm import bank_overlap

    if isinstance(bank, np.ndarray):
        cosine = _normalised(bank_feats) @ _normalised(query_feats).T
        nearest = cosine.argmax(axis=1)
        same = cosine[np.arange(len(nearest)), nearest] >= 1 - 1e-4
        return bank_overlap([int(q) if s else ("bank", b) for b, (q, s) in enumerate(zip(nearest, same))],
                            range(len(texts)))
    from modules.tokenizer import text_as_read

    max_words = index.model.config.max_words
    return bank_overlap([text_as_read(index.tokenizer, t, max_words) for t in bank],
                        [text_as_read(index.tokenizer, t, max_words) for t in texts])


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------ evaluation
def _ranked(scores: np.ndarray, relevant: list[int], groups: np.ndarray | None):
    """(ranks, scores, entries): 1-based rank of each query's relevant item (an entry, or with ``groups`` a
    file scored by its best entry; ties as compute_ranks), its score, and the entry behind that score."""
    from modules.metrics import compute_ranks

    rel = np.asarray(relevant)
    rows = np.arange(len(rel))
    if groups is None:
        return compute_ranks(scores, rel) + 1, scores[rows, rel], rel
    best, where = best_per_video(scores, groups)
    return compute_ranks(best, rel) + 1, best[rows, rel], where[rows, rel]


def query_ranks(query_features: np.ndarray, index_features: np.ndarray, relevant: list[int],
                groups: np.ndarray | None = None):
    """(ranks, scores, entries) of cosine similarity: see :func:`_ranked`."""
    sims = _normalised(query_features) @ _normalised(index_features).T
    return _ranked(sims, relevant, groups)


def metrics(ranks: np.ndarray) -> dict:
    from modules.metrics import metrics_from_ranks

    m = metrics_from_ranks(np.asarray(ranks) - 1)
    return {"R1": m["R1"], "R5": m["R5"], "R10": m["R10"], "median_rank": m["MR"], "mean_rank": m["MeanR"],
            "queries": m["num_queries"]}


def format_metrics(m: dict, label: str) -> str:
    return (f"{label}: R@1 {m['R1']:.1f}  R@5 {m['R5']:.1f}  R@10 {m['R10']:.1f}  median rank "
            f"{m['median_rank']:g}  mean rank {m['mean_rank']:.2f}  ({m['queries']} queries)")


def qb_normalised_ranks(query_features, bank_features, index_features, relevant, scale: float, k: int,
                        theta: float, beta: float, groups: np.ndarray | None = None):
    """(ranks, scores, entries) after QB-norm of the (queries x entries) scores with the (bank x entries)
    scores, both ``scale`` x cosine (main.py's similarity); with ``groups``, files are then scored by their
    best normalised entry."""
    from modules.qb_norm import qb_norm

    gallery = _normalised(index_features).T
    test = (scale * (_normalised(query_features) @ gallery)).astype(np.float32)
    bank = (scale * (_normalised(bank_features) @ gallery)).astype(np.float32)
    return _ranked(qb_norm(bank, test, k, beta, theta), relevant, groups)


def evaluate_index(index, queries: list[dict], relevant: list[int], bank=None, qb_k: int = 1,
                   qb_theta: float = 3, qb_beta: float = 0.87, queries_path: str = "",
                   groups: np.ndarray | None = None, bank_path: str = "") -> dict:
    """Ranks and metrics of ``queries`` on an opened :class:`~retrieval.index.VideoIndex` (with its model),
    plus QB-norm ones with ``bank`` (texts or features). ``relevant``: entry rows, or with ``groups`` (each
    entry's file number, :func:`video_groups`) file numbers, files then scored by their best entry."""
    texts = [q["query"] for q in queries]
    query_feats = index.encode_texts(texts).numpy()
    index_feats = index.features().float().numpy()
    ranks, scores, best = query_ranks(query_feats, index_feats, relevant, groups)
    result = {"metrics": metrics(ranks), "ranks": ranks, "scores": scores, "entries": best, "qb_norm": None}
    if bank is not None:
        if isinstance(bank, np.ndarray):
            if bank.shape[1] != query_feats.shape[1]:
                raise _search_error(f"--qb_norm: the bank's features have {bank.shape[1]} dimensions, the model's "
                                    f"{query_feats.shape[1]}")
            bank_feats, size = bank, bank.shape[0]
        else:
            bank_feats, size = index.encode_texts(bank).numpy(), len(bank)
        overlap = bank_queries(bank, texts, query_feats, bank_feats, index)
        if overlap["every_query"]:  # each query would be normalised with itself: the scores leak
            b, q = overlap["shared"][0]
            what = "the features" if isinstance(bank, np.ndarray) else "the text (case, spacing and punctuation aside)"
            raise _search_error(f"--qb_norm {_where(bank, b, bank_path)}: the bank holds every evaluated query of "
                                f"{queries_path}, e.g. this row has {what} of the query of "
                                f"{queries[q].get('where', f'query {q + 1}')}; "
                                "QB-norm needs a bank of other queries")
        scale = float(index.model.clip.logit_scale.exp()) if index.model is not None else 100.0
        qb_ranks, qb_scores, qb_best = qb_normalised_ranks(query_feats, bank_feats, index_feats, relevant, scale,
                                                           qb_k, qb_theta, qb_beta, groups)
        shared = len(overlap["shared"])
        result["qb_norm"] = {"metrics": metrics(qb_ranks), "ranks": qb_ranks, "scores": qb_scores,
                             "entries": qb_best, "bank_size": size,
                             "bank_queries_also_evaluated": shared, "k": qb_k, "theta": qb_theta, "beta": qb_beta}
        if shared:
            b, q = overlap["shared"][0]
            result["qb_norm"]["first_shared"] = (f"--qb_norm {_where(bank, b, bank_path)} is "
                                                 f"{queries[q].get('where', f'query {q + 1}')}")
    return result


def cmd_evaluate(args, load) -> int:
    """The subcommand (``load(args, record)``: the CLI's model loader)."""
    from retrieval.index import VideoIndex
    from runtime.files import atomic_write_text

    record = VideoIndex._read_meta(args.index)
    repeats: list = []
    queries = read_queries(args.queries, args.video_root, repeats)
    bank = read_bank(args.qb_norm) if args.qb_norm else None
    if args.qb_k < 1 or args.qb_theta <= 0:
        raise _search_error("--qb_k must be >= 1 and --qb_theta > 0")
    loaded = load(args, record)
    from retrieval.locks import reading

    with reading(args.index):  # the features as one index run left them, read whole
        index = VideoIndex.open(args.index, model=loaded.model, tokenizer=loaded.tokenizer,
                                fingerprint=loaded.info["fingerprint"]).keep_in_memory()
    entries = index.entries
    groups = None
    if args.by_video:
        files, groups = video_groups(entries)
        relevant = match_videos(queries, files, args.queries, args.index)
        gallery = f"{len(files)} files, each scored by its best of {len(entries)} entries"
        spans = sum(q["start"] is not None for q in queries)
        if spans:
            print(f"note: --by_video ranks whole files: the start/end of {spans} queries are not used")
    else:
        relevant = match_entries(queries, entries, args.queries, args.index)
        gallery = f"{len(entries)} entries"
    if repeats:
        print(f"note: {len(repeats)} row(s) of {args.queries} repeat an earlier row (same query and video) and "
              f"are counted once, e.g. {repeats[0]}")
    result = evaluate_index(index, queries, relevant, bank, args.qb_k, args.qb_theta, args.qb_beta, args.queries,
                            groups, bank_path=args.qb_norm or "")
    print(format_metrics(result["metrics"], f"{args.queries} on {args.index} ({gallery})"))
    qb = result["qb_norm"]
    if qb is not None:
        if qb["bank_queries_also_evaluated"]:
            print(f"note: {qb['bank_queries_also_evaluated']} query bank rows are also evaluated queries as the "
                  f"model reads them (e.g. {qb['first_shared']}); their QB-norm scores are optimistic")
        print(format_metrics(qb["metrics"], f"with QB-norm (bank of {qb['bank_size']}, beta {args.qb_beta:g})"))
    if args.json:
        per_query = []
        for i, q in enumerate(queries):
            best = entries[int(result["entries"][i])]
            item = {"row": q["where"], "query": q["query"], "video": q["video"], "path": best["path"],
                    "rank": int(result["ranks"][i]), "score": round(float(result["scores"][i]), 6)}
            if q["start"] is not None:
                item.update(start=q["start"], end=q["end"])
            if args.by_video and best.get("start") is not None:  # the segment that scored the file
                item.update(best_start=best["start"], best_end=best["end"])
            if qb is not None:
                item["rank_qb_norm"] = int(qb["ranks"][i])
                item["score_qb_norm"] = round(float(qb["scores"][i]), 6)
                best_qb = entries[int(qb["entries"][i])]
                if args.by_video and best_qb.get("start") is not None:  # after QB-norm another may win
                    item.update(best_start_qb_norm=best_qb["start"], best_end_qb_norm=best_qb["end"])
            per_query.append(item)
        payload = {"index": os.path.abspath(args.index), "queries": os.path.abspath(args.queries),
                   "entries": len(entries),
                   "ranks": ("1-based position of the query's file among all indexed files, each scored by its "
                             "best entry" if args.by_video else "1-based position of the query's video among all "
                             "entries"),
                   "metrics": result["metrics"],
                   "qb_norm": None if qb is None else {k: v for k, v in qb.items()
                                                       if k not in ("ranks", "scores", "entries")},
                   "per_query": per_query}
        atomic_write_text(args.json, json.dumps(payload, indent=1) + "\n")
        print(f"per-query ranks: {args.json}")
    return 0
