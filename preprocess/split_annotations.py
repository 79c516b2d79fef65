"""A video-disjoint train/test split of one annotation file of ``--datatype custom``.

    python -m preprocess.split_annotations ANNOTATIONS --out_dir DIR [--test_fraction 0.2] [--seed 0]

ANNOTATIONS is a ``.csv``, ``.tsv`` or ``.jsonl`` file with a ``video`` column (see
``dataloaders/custom.py``). Rows are grouped by video FILE (the ``video`` value: every span and every
caption of one file stays on one side), the files are shuffled with ``--seed`` and
``round(test_fraction * files)`` of them (at least one, and at least one left for training) make the test
split. ``DIR/train.<ext>`` and ``DIR/test.<ext>`` keep the input's rows unchanged, in the input's order and
format; the counts of both sides are printed. Bad input: one line ``split_annotations: error: ...`` and
exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import random
import sys
from typing import Optional

from dataloaders.base import AnnotationError
from dataloaders.custom import parse_rows
from runtime.errors import finite_float
from runtime.files import OutputWriteError, atomic_write_text

PROG = "split_annotations"


class SplitError(AnnotationError):
    """Bad input; the message is one line naming the file and the line."""


def read_rows(path: str) -> tuple[str, list[str] | None, list[tuple[int, object, str]]]:
    """``(kind, header, rows)``; rows are ``(line number, row as read, video value)``: a list of values for
    .csv/.tsv, the original text line for .jsonl (written back unchanged). Read as ``--datatype custom``
    reads it (``dataloaders.custom.parse_rows``), so a file that splits is a file that trains."""
    kind, header, parsed = parse_rows(path, required=("video",))
    for number, _, values in parsed:
        if not values.get("video"):
            raise SplitError(f"{path} line {number} column 'video': missing or empty")
    return kind, header, [(number, raw, values["video"]) for number, raw, values in parsed]


def split_files(videos: list[str], test_fraction: float, seed: int) -> set[str]:
    """The video files of the test side: a seeded shuffle of the distinct files, the first
    ``round(test_fraction * n)`` (clamped to 1 .. n - 1)."""
    files = sorted(set(videos))
    if len(files) < 2:
        raise SplitError(f"need at least 2 distinct video files to split, found {len(files)}")
    random.Random(seed).shuffle(files)
    n_test = min(max(1, round(test_fraction * len(files))), len(files) - 1)
    return set(files[:n_test])


def render(kind: str, header: Optional[list[str]], rows: list[tuple[int, object, str]]) -> str:
    if kind == "jsonl":
        return "".join(str(r[1]) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="," if kind == "csv" else "\t", lineterminator="\n")
    writer.writerow(header)
    for _, values, _ in rows:
        writer.writerow(values)
    return buf.getvalue()


def _counts(rows) -> str:
    return f"{len({r[2] for r in rows})} video files, {len(rows)} rows"


def split_annotations(path: str, out_dir: str, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write ``out_dir/train.<ext>`` and ``out_dir/test.<ext>``; returns the counts and file names."""
    if not 0.0 < test_fraction < 1.0:
        raise SplitError(f"--test_fraction must be between 0 and 1, got {test_fraction}")
    kind, header, rows = read_rows(path)
    test_files = split_files([r[2] for r in rows], test_fraction, seed)
    train = [r for r in rows if r[2] not in test_files]
    test = [r for r in rows if r[2] in test_files]
    out = {"train": os.path.join(out_dir, f"train.{kind}"), "test": os.path.join(out_dir, f"test.{kind}")}
    source = os.path.abspath(path)
    if source in (os.path.abspath(out["train"]), os.path.abspath(out["test"])):
        raise SplitError(f"{path}: the input would be overwritten by the split; choose another --out_dir")
    atomic_write_text(out["train"], render(kind, header, train))
    atomic_write_text(out["test"], render(kind, header, test))
    return {"files": out, "train_videos": len({r[2] for r in train}), "train_rows": len(train),
            "test_videos": len({r[2] for r in test}), "test_rows": len(test),
            "summary": f"train: {_counts(train)} -> {out['train']}\ntest: {_counts(test)} -> {out['test']}"}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="A video-disjoint train/test split of an annotation file.")
    p.add_argument("annotations", help=".csv, .tsv or .jsonl with a 'video' column")
    p.add_argument("--out_dir", required=True, help="where train.<ext> and test.<ext> are written")
    p.add_argument("--test_fraction", type=finite_float, default=0.2, help="share of the video files in the test split")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        result = split_annotations(args.annotations, args.out_dir, args.test_fraction, args.seed)
    except (AnnotationError, OutputWriteError) as exc:  # SplitError is an AnnotationError
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
