"""Your own captioned videos (``--datatype custom``): one annotation file per split.

``--train_csv FILE`` / ``--val_csv FILE`` (the test split; FILE ``.csv``, ``.tsv`` or ``.jsonl``, told
apart by the extension, UTF-8) with the columns (keys, for JSON lines):

* ``video``: the video file, relative to ``--features_path`` or absolute;
* ``caption``: one caption (a video with several captions has several rows);
* ``start``, ``end`` (optional, seconds): the clip is this span of the file, cut with the frame rule of
  ActivityNet / DiDeMo (:func:`dataloaders.video.published_clip_seconds`); empty in a row = the whole file;
* ``video_id`` (optional): rows with the same id are one video; default: rows naming one file (whatever
  the spelling: ``x.mp4``, ``./x.mp4``, its absolute path, a link to it) and one span are one video, its
  id the first row's ``video`` value, plus ``@start-end`` for a span;
* ``group`` (optional, training): rows with the same value go into the same global batch with
  ``--batch_groups`` (e.g. a clip and its order-swapped twin); every row needs one then;
* ``order_twin`` (optional, test): the caption with its events in the other order ("up then left" for
  "left then up"); the evaluation's order metric scores each caption against its twin.

Training samples: with ``--expand_msrvtt_sentences`` every caption is a sample; without it a sample
is a video with one of its captions drawn at random at every access (once per epoch), as for MSR-VTT.
Test: every caption is a query, each video (or span) is encoded once; a video with several captions is
scored as VATEX / MSVD are (see :mod:`modules.metrics`).

Rows that repeat an earlier row (same video, span and caption) are dropped, with a warning that counts
them. Every error names the file, the line and the column.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

from .base import AnnotationError, Annotations, VideoEntry, VideoTextDataset, get_option, read_text

logger = logging.getLogger(__name__)

EXTENSIONS = (".csv", ".tsv", ".jsonl")
REQUIRED = ("video", "caption")
COLUMNS = REQUIRED + ("start", "end", "video_id", "query", "group", "order_twin")  # the keys the tools read
TEXT_COLUMNS = ("video", "caption", "query", "group", "order_twin")
MISSING_WRITTEN_OUT = ("nan", "none", "null")  # e.g. pandas' astype(str) of a missing value
SEPARATORS = (("\t", "tab"), (",", "comma"), (";", "semicolon"))


@dataclass(frozen=True)
class AnnotationRow:
    where: str  # "train.csv line 7"
    video: str  # as written in the file
    path: str  # resolved file path
    caption: str
    start: Optional[float]
    end: Optional[float]
    video_id: str
    file: str  # the file's canonical path (video_file): its identity, whatever the spelling
    group: Optional[str] = None  # None: no 'group' column (key); "": an empty value
    order_twin: Optional[str] = None


def annotation_format(path: str, flag: str = "") -> str:
    """'csv', 'tsv' or 'jsonl' by the file's extension; anything else is an :class:`AnnotationError`."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        named = f"{flag} {path}" if flag else path
        raise AnnotationError(f"{named}: unknown annotation file extension {ext or '(none)'!r} "
                              f"(use .csv, .tsv or .jsonl)")
    return ext[1:]


def parse_rows(path: str, required=(), flag: str = "") -> tuple[str, Optional[list[str]], list[tuple[int, object, dict]]]:
    """``(kind, header, rows)`` of a .csv / .tsv / .jsonl file. A row is ``(line number, the row as read,
    values)``: as read is the CSV values or the JSON line itself (so that a tool can write it back
    unchanged); values maps columns to stripped strings (None when absent). Blank lines are skipped; the
    ``required`` columns must exist (CSV header, or every JSON object's keys). ``header`` is None for .jsonl.

    Every row is one line of the file: a value that runs over several lines (in CSV / TSV, a quote that is
    never closed takes in the lines after it), a quote in the wrong place, a header that names a column
    twice, a value under no column, a JSON key given twice and a list or object as a value are
    :class:`AnnotationError` s naming the file and the line where the row starts."""
    kind = annotation_format(path, flag)
    text = read_text(path)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise AnnotationError(f"{path} line {line}: a NUL character; the file is not UTF-8 text (UTF-16?): "
                              "save it as UTF-8")
    if kind == "jsonl":
        rows = _jsonl_rows(path, text, required)
        header = None
    else:
        header, rows = _delimited_rows(path, text, kind, required)
    if not rows:
        raise AnnotationError(f"{path}: no rows (nothing but {'blank lines' if kind == 'jsonl' else 'a header'})")
    return kind, header, rows


def _jsonl_rows(path: str, text: str, required) -> list[tuple[int, object, dict]]:
    rows: list[tuple[int, object, dict]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line, object_pairs_hook=lambda pairs: _object_once(path, number, pairs),
                              parse_constant=lambda name: _not_a_value(path, number, name))
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{path} line {number}: not a JSON object ({exc.msg}; one object per line)") from exc
        if not isinstance(item, dict):
            raise AnnotationError(f"{path} line {number}: not a JSON object (a {type(item).__name__})")
        for key in required:
            if key not in item:
                raise AnnotationError(f"{path} line {number}: missing key '{key}'")
        for key, value in item.items():
            if key in COLUMNS and isinstance(value, (list, dict, bool)):
                what = json.dumps(value) if isinstance(value, bool) else type(value).__name__
                raise AnnotationError(f"{path} line {number} key '{key}': a JSON {what}, not a text or a number "
                                      "(one row per caption)")
        rows.append((number, line.rstrip("\r"), {k: _as_text(v) for k, v in item.items()}))
    return rows


def _not_a_value(path: str, number: int, name: str):
    """``NaN`` / ``Infinity`` (which ``json`` reads, and writes for a missing float) are refused."""
    raise AnnotationError(f"{path} line {number}: {name} is not a value (a missing value? leave the key out, or "
                          "write null)")


def _object_once(path: str, number: int, pairs) -> dict:
    """A JSON object whose keys are all different (``json`` keeps the last of a repeated key silently)."""
    item: dict = {}
    for key, value in pairs:
        if key in item:
            raise AnnotationError(f"{path} line {number}: key '{key}' given twice")
        item[key] = value
    return item


def _delimited_rows(path: str, text: str, kind: str, required) -> tuple[list[str], list[tuple[int, object, dict]]]:
    """Header and rows of a .csv / .tsv text, each row on one line (see :func:`parse_rows`)."""
    # strict: a quote in the middle of a quoted value is an error, not a value glued together
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if kind == "csv" else "\t", strict=True)
    records: list[tuple[int, list[str]]] = []
    last = 0  # the last line read so far
    try:
        for values in reader:
            first, last = last + 1, reader.line_num
            if last > first:
                raise AnnotationError(f"{path} line {first}: a value runs over lines {first}-{last} (a quote \" "
                                      "that is never closed?); every row must be one line")
            records.append((first, values))
    except csv.Error as exc:
        start = last + 1
        if "field larger than field limit" in str(exc):
            problem = (f"a value longer than {csv.field_size_limit()} characters (a quote \" that is never "
                       "closed?)")
        elif "unexpected end of data" in str(exc):
            problem = "a quote \" opened in this row is never closed (the rest of the file would be one value)"
        else:
            problem = (f"misplaced quote ({exc}); a value that holds a quote \" or a "
                       f"{'comma' if kind == 'csv' else 'tab'} is written in quotes, its quotes doubled (\"\")")
        raise AnnotationError(f"{path} line {start}: {problem}") from None
    if not records:
        raise AnnotationError(f"{path}: the file is empty (no header)")
    header = records[0][1]
    header_row = [h.strip() for h in header]
    named = [h for h in header_row if h]
    twice = next((h for i, h in enumerate(named) if h in named[:i]), None)
    if twice is not None:
        raise AnnotationError(f"{path} line 1: column '{twice}' named twice (columns found: {', '.join(header_row)})")
    missing = [c for c in required if c not in header_row]
    if missing:
        found = ", ".join(repr(h) for h in header_row) or "none"
        other = next((name for sep, name in SEPARATORS if len(header_row) == 1 and sep in header_row[0]), None)
        hint = {"tab": "; tab-separated? name the file .tsv", "comma": "; comma-separated? name the file .csv",
                "semicolon": "; separated by semicolons? write it with commas (.csv) or tabs (.tsv)"}.get(other, "")
        raise AnnotationError(f"{path} line 1: missing column '{missing[0]}' (columns found: {found}){hint}")
    rows: list[tuple[int, object, dict]] = []
    no_name = [i for i, h in enumerate(header_row) if not h]
    for number, values in records[1:]:
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(header_row):
            raise AnnotationError(f"{path} line {number}: {len(values)} values for {len(header_row)} columns "
                                  f"(quote a {'comma' if kind == 'csv' else 'tab'} inside a value)")
        unnamed = next((i for i in no_name if i < len(values) and values[i].strip()), None)
        if unnamed is not None:
            raise AnnotationError(f"{path} line {number}: a value in column {unnamed + 1}, which the header "
                                  "(line 1) does not name")
        if values[0].strip().lstrip("\ufeff") == header_row[0] and \
                [v.strip().lstrip("\ufeff") for v in values] == header_row:  # a second file's byte order mark
            raise AnnotationError(f"{path} line {number}: the header again (two files joined?); keep one header")
        row = {h: (values[i].strip() if i < len(values) else None) for i, h in enumerate(header_row) if h}
        rows.append((number, values, row))
    return header, rows


def read_table(path: str, required=REQUIRED, flag: str = "") -> list[tuple[str, dict]]:
    """``(where, row)`` for every row of a .csv / .tsv / .jsonl file, values as stripped strings (None when
    absent); checks that the ``required`` columns exist and are non-empty in every row."""
    _, header, parsed = parse_rows(path, required, flag)
    first_use: dict[str, str] = {}  # each column (key) and where it is named first
    for number, _, row in parsed[:1] if header is not None else parsed:
        for column in row:
            first_use.setdefault(column, f"line 1 column '{column}'" if header is not None
                                 else f"line {number} key '{column}'")
    for column, where in first_use.items():
        meant = _misspelt(column)
        if meant:
            raise AnnotationError(f"{path} {where}: not a column this reads, so its values would be ignored; "
                                  f"'{meant}' is (rename it)")
    name = os.path.basename(path)
    rows = [(f"{name} line {number}", row) for number, _, row in parsed]
    for where, row in rows:
        for column in required:
            if not row.get(column):
                raise AnnotationError(f"{path} {where.split(' ', 1)[1]} column '{column}': empty value")
        for column in TEXT_COLUMNS:
            if (row.get(column) or "").lower() in MISSING_WRITTEN_OUT:
                raise AnnotationError(f"{path} {where.split(' ', 1)[1]} column '{column}': {row[column]!r} is a "
                                      "missing value written out as text (leave it empty, or drop the row)")
    return rows


def _misspelt(column: str) -> Optional[str]:
    """The column of :data:`COLUMNS` that ``column`` (not one of them) looks like a misspelling of, if any
    ('Start', 'video-id', 'strat'): such a column would be ignored and its rows read without it."""
    if not column or column in COLUMNS:
        return None
    plain = column.lower().replace("-", "_").replace(" ", "_")
    if plain in COLUMNS or plain.replace("_", "") in [c.replace("_", "") for c in COLUMNS]:
        return next(c for c in COLUMNS if c.replace("_", "") == plain.replace("_", ""))
    close = difflib.get_close_matches(plain, COLUMNS, n=1, cutoff=0.8)
    return close[0] if close else None


def _as_text(value) -> Optional[str]:
    if value is None:
        return None
    return value.strip() if isinstance(value, str) else str(value)


def _seconds(path: str, where: str, column: str, value: Optional[str]) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        if "_" in value:  # float() reads '1_0' as 10
            raise ValueError(value)
        seconds = float(value)
    except ValueError:
        raise AnnotationError(f"{path} {where} column '{column}': {value!r} is not a number (seconds)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise AnnotationError(f"{path} {where} column '{column}': {value!r} is not a time in seconds >= 0")
    return seconds


def row_span(path: str, line: str, row: dict) -> tuple[Optional[float], Optional[float]]:
    """``(start, end)`` in seconds of a row's ``start`` / ``end`` columns, or ``(None, None)`` for the whole
    video; both or neither, numbers >= 0, start before end, else an :class:`AnnotationError` naming
    ``path``, ``line`` ("line 7") and the column."""
    start = _seconds(path, line, "start", row.get("start"))
    end = _seconds(path, line, "end", row.get("end"))
    if (start is None) != (end is None):
        given, other = ("start", "end") if start is not None else ("end", "start")
        raise AnnotationError(f"{path} {line} column '{other}': empty, but '{given}' is given (give both "
                              "for a span, neither for the whole video)")
    if start is not None and not start < end:
        raise AnnotationError(f"{path} {line} column 'start': {start:g} is not before end {end:g}")
    return start, end


def _span_text(start: float, end: float) -> str:
    return f"{start:g}-{end:g}"


def video_file(video: str, root: str) -> str:
    """The canonical path of a table's ``video`` value: taken relative to ``root`` (the folder the loader
    reads it from) unless absolute, then absolute with links, ``.`` and ``..`` resolved, so that
    ``videos/x.mp4``, ``./videos/x.mp4``, its absolute path and a link to it are one file."""
    return os.path.realpath(video if os.path.isabs(video) else os.path.join(root or "", video))


def read_annotation_rows(path: str, features_path: str, flag: str = "", warn: bool = True) -> list[AnnotationRow]:
    """The rows of one custom annotation file, checked (times are numbers, start before end) and with the
    video paths resolved against ``features_path``; exact repeats of a row are dropped (with a warning
    unless not ``warn``).
    Rows without a ``video_id`` are one video when they name one file (:func:`video_file`) and span: the
    id is the spelling of the first of them."""
    rows = []
    seen: dict = {}
    repeats = []
    default_ids: dict[tuple, str] = {}  # (file, start, end) -> the default id of its first row
    paths: dict[str, tuple[str, str]] = {}  # video value -> (path, canonical file), resolved once
    for where, row in read_table(path, REQUIRED, flag):
        start, end = row_span(path, where.split(" ", 1)[1], row)
        video = row["video"]
        if video not in paths:
            resolved = video if os.path.isabs(video) else os.path.join(features_path or "", video)
            paths[video] = (os.path.normpath(resolved), video_file(video, features_path))
        resolved, file = paths[video]
        default_id = default_ids.setdefault((file, start, end),
                                            video if start is None else f"{video}@{_span_text(start, end)}")
        video_id = row.get("video_id") or default_id
        key = (video_id, row["caption"])
        if key in seen:
            repeats.append(where)
            continue
        seen[key] = where
        rows.append(AnnotationRow(where, video, resolved, row["caption"], start, end, video_id, file,
                                  row.get("group"), row.get("order_twin") or None))
    if repeats and warn:
        logger.warning("%s: %d duplicate row(s) (same video and caption as an earlier row) dropped, e.g. %s",
                       path, len(repeats), repeats[0])
    return rows


def group_videos(path: str, rows: list[AnnotationRow]) -> Annotations:
    """One :class:`VideoEntry` per ``video_id`` (in order of first appearance), every caption linked to it.
    Rows that give one id to different files or spans are an error."""
    index: dict[str, int] = {}
    files: list[str] = []  # each video's canonical file
    videos, captions, links, sources = [], [], [], []
    for r in rows:
        if r.video_id not in index:
            index[r.video_id] = len(videos)
            videos.append(VideoEntry(r.video_id, r.path, r.where, r.start, r.end))
            files.append(r.file)
        else:
            first = videos[index[r.video_id]]
            if (files[index[r.video_id]], first.start, first.end) != (r.file, r.start, r.end):
                column = "video" if files[index[r.video_id]] != r.file else "start"
                raise AnnotationError(f"{path} {r.where.split(' ', 1)[1]} column '{column}': video_id "
                                      f"{r.video_id!r} is already another video or span ({first.source})")
        captions.append(r.caption)
        links.append(index[r.video_id])
        sources.append(r.where)
    return Annotations(videos, captions, links, sources)


def files_in_both(train_rows: list[AnnotationRow], test_rows: list[AnnotationRow]) -> list[str]:
    """Video files (canonical paths) of the test rows that training rows also use (any span of them, any
    spelling of the file), in test order."""
    train_files = {r.file for r in train_rows}
    return list(dict.fromkeys(r.file for r in test_rows if r.file in train_files))


class CustomDataset(VideoTextDataset):
    name = "custom"
    flags = {"train": "--train_csv", "val": "--val_csv", "test": "--val_csv"}

    def __init__(self, args, tokenizer, split: str, eval_sampling: bool = False):
        self.expand_sentences = bool(get_option(args, "expand_msrvtt_sentences", False))
        super().__init__(args, tokenizer, split, eval_sampling)

    def annotation_file(self) -> str:
        flag = self.flags[self.split]
        path = get_option(self.args, flag[2:], "")
        if not path:
            raise AnnotationError(f"--datatype custom needs {flag} <annotation file> for the {self.split} split")
        return path

    def load_annotations(self) -> Annotations:
        path = self.annotation_file()
        self.rows = read_annotation_rows(path, self.features_path, self.flags[self.split])
        self.caption_rows = list(self.rows)  # the row of each caption (captions follow the rows' order)
        return group_videos(path, self.rows)

    @property
    def order_twins(self) -> list[Optional[str]]:
        """Each caption's ``order_twin`` (None where the row has none)."""
        return [r.order_twin for r in self.caption_rows]

    def leave_out_videos(self, indices) -> int:
        indices = [int(i) for i in indices]
        drop = {self.videos[i].video_id for i in indices}
        self.caption_rows = [r for r in self.caption_rows if r.video_id not in drop]
        return super().leave_out_videos(indices)

    def item_groups(self) -> list[str]:
        """The ``group`` of every training item (a caption, or a video without --expand_msrvtt_sentences),
        for ``--batch_groups``; an :class:`AnnotationError` when the file has no group column, a row has an
        empty one or the rows of one video give it different groups."""
        path = self.annotation_file()
        if all(r.group is None for r in self.caption_rows):
            raise AnnotationError(f"--batch_groups needs a 'group' column in {self.flags[self.split]} {path}")
        for r in self.caption_rows:
            if not r.group:
                raise AnnotationError(f"{path} {r.where.split(' ', 1)[1]} column 'group': empty value "
                                      "(--batch_groups needs a group on every row)")
        if not self.sample_per_video:
            return [r.group for r in self.caption_rows]
        groups: dict[str, AnnotationRow] = {}
        for r in self.caption_rows:
            first = groups.setdefault(r.video_id, r)
            if first.group != r.group:
                raise AnnotationError(f"{path} {r.where.split(' ', 1)[1]} column 'group': {r.group!r}, but "
                                      f"video {r.video_id!r} is in group {first.group!r} ({first.where}); "
                                      "without --expand_msrvtt_sentences a video is one sample, in one group")
        return [groups[v.video_id].group for v in self.videos]

    @property
    def sample_per_video(self) -> bool:  # type: ignore[override]
        return self.train and not self.expand_sentences
