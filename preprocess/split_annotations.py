"""A video-disjoint train/test split of one annotation file of ``--datatype custom``.

    python -m preprocess.split_annotations ANNOTATIONS --out_dir DIR [--test_fraction 0.2] [--seed 0]
                                           [--video_root ROOT] [--overwrite]

ANNOTATIONS is a ``.csv``, ``.tsv`` or ``.jsonl`` file with a ``video`` column (see
``dataloaders/custom.py``). Rows are grouped by video FILE (every span and every caption of one file stays
on one side; the file is the ``video`` value taken relative to ``--video_root``, default DIR, the folder
``scripts/custom.sh`` reads the videos from, and made canonical as training makes it, so that
``x.mp4``, ``./x.mp4`` and its absolute path are one file), the files are shuffled with ``--seed`` and
``round(test_fraction * files)`` of them (at least one, and at least one left for training) make the test
split. ``DIR/train.<ext>`` and ``DIR/test.<ext>`` keep the input's rows unchanged, in the input's order and
format; the counts of both sides are printed. A split already in DIR (``train`` / ``test`` in any of the
three formats) is replaced only with ``--overwrite``, unless the new one is the same (a rerun). The table
is checked as training checks it; bad input: one line ``split_annotations: error: ...`` and exit status 2,
before anything is written.
"""
from __future__ import annotations

import csv
import io
import os
import random
import sys
from typing import Optional

from dataloaders.base import AnnotationError
from dataloaders.custom import EXTENSIONS, group_videos, parse_rows, read_annotation_rows, video_file
from runtime.errors import OneLineArgumentParser, finite_float
from runtime.files import OutputWriteError, atomic_write_text

PROG = "split_annotations"


class SplitError(AnnotationError):
    """Bad input; the message is one line naming the file and the line."""


def read_rows(path: str, video_root: str = "") -> tuple[str, list[str] | None, list[tuple[int, object, str, str]]]:
    """``(kind, header, rows)``; rows are ``(line number, row as read, video file, group)``: a list of values
    for .csv/.tsv, the original text line for .jsonl (written back unchanged); the file is the canonical path
    of the ``video`` value taken relative to ``video_root`` (``dataloaders.custom.video_file``); the group is
    the ``group`` value ("" without one). Read and checked as ``--datatype custom`` reads and checks it, so a
    file that splits is a file that trains."""
    group_videos(path, read_annotation_rows(path, video_root, warn=False))  # every check of training's
    kind, header, parsed = parse_rows(path, required=("video",))
    return kind, header, [(number, raw, video_file(values["video"], video_root), values.get("group") or "")
                          for number, raw, values in parsed]


def split_units(rows) -> list[tuple[str, ...]]:
    """The files that must stay on one side together, sorted: each file alone, except that files whose rows
    share a ``group`` value (a clip and its order-swapped twin) are one unit, so that no group is split
    between training and test."""
    parent: dict[str, str] = {}

    def root(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    first_of_group: dict[str, str] = {}
    for _, _, file, group in rows:
        parent.setdefault(file, file)
        if group:
            other = first_of_group.setdefault(group, file)
            a, b = root(file), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    units: dict[str, list[str]] = {}
    for f in parent:
        units.setdefault(root(f), []).append(f)
    return sorted(tuple(sorted(u)) for u in units.values())


def split_files(units: list[tuple[str, ...]], test_fraction: float, seed: int) -> set[str]:
    """The video files of the test side: a seeded shuffle of the units (:func:`split_units`; one file each
    without groups), the files of the first ``round(test_fraction * n)`` (clamped to 1 .. n - 1)."""
    units = sorted(units)
    if len(units) < 2:
        what = "video files" if all(len(u) == 1 for u in units) else "video files or groups of them"
        raise SplitError(f"need at least 2 distinct {what} to split, found {len(units)}")
    random.Random(seed).shuffle(units)
    n_test = min(max(1, round(test_fraction * len(units))), len(units) - 1)
    return {f for unit in units[:n_test] for f in unit}


def render(kind: str, header: Optional[list[str]], rows: list[tuple[int, object, str]]) -> str:
    if kind == "jsonl":
        return "".join(str(r[1]) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="," if kind == "csv" else "\t", lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(row[1])
    return buf.getvalue()


def _counts(rows) -> str:
    return f"{len({r[2] for r in rows})} video files, {len(rows)} rows"


def _earlier_split(out: dict, texts: dict, overwrite: bool) -> bool:
    """True when ``out_dir`` already holds exactly this split (nothing to write). Another split there is
    refused unless ``overwrite`` (and one in another format always: two would leave the choice open)."""
    folder = os.path.dirname(out["train"]) or "."
    ours = {os.path.abspath(f) for f in out.values()}
    others = [os.path.join(folder, f"{side}{ext}") for side in ("train", "test") for ext in EXTENSIONS]
    others = [f for f in others if os.path.abspath(f) not in ours and os.path.exists(f)]
    if others:
        raise SplitError(f"{folder} already holds a split in another format ({others[0]}); remove it or choose "
                         "another --out_dir (two would leave the choice to scripts/custom.sh)")
    existing = [f for f in out.values() if os.path.exists(f)]
    if not existing or overwrite:
        return False
    same = all(os.path.isfile(out[s]) and open(out[s], encoding="utf-8", newline="").read() == texts[s]
               for s in out)
    if same:
        return True
    raise SplitError(f"{folder} already holds another split ({existing[0]}); pass --overwrite to replace it, or "
                     "choose another --out_dir")


def split_annotations(path: str, out_dir: str, test_fraction: float = 0.2, seed: int = 0,
                      video_root: Optional[str] = None, overwrite: bool = False) -> dict:
    """Write ``out_dir/train.<ext>`` and ``out_dir/test.<ext>``; returns the counts and file names.
    ``video_root``: the folder relative ``video`` values are relative to (default ``out_dir``)."""
    if not 0.0 < test_fraction < 1.0:
        raise SplitError(f"--test_fraction must be between 0 and 1, got {test_fraction}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SplitError(f"--out_dir {out_dir} is a file, not a folder")
    kind, header, rows = read_rows(path, out_dir if video_root is None else video_root)
    test_files = split_files(split_units(rows), test_fraction, seed)
    train = [r for r in rows if r[2] not in test_files]
    test = [r for r in rows if r[2] in test_files]
    out = {"train": os.path.join(out_dir, f"train.{kind}"), "test": os.path.join(out_dir, f"test.{kind}")}
    source = os.path.abspath(path)
    if source in (os.path.abspath(out["train"]), os.path.abspath(out["test"])):
        raise SplitError(f"{path}: the input would be overwritten by the split; choose another --out_dir")
    texts = {"train": render(kind, header, train), "test": render(kind, header, test)}
    try:
        unchanged = _earlier_split(out, texts, overwrite)
    except (OSError, UnicodeDecodeError) as exc:
        raise SplitError(f"{out_dir}: cannot read the split already there ({exc}); remove it or choose another "
                         "--out_dir") from None
    if not unchanged:
        atomic_write_text(out["train"], texts["train"])
        atomic_write_text(out["test"], texts["test"])
    return {"unchanged": unchanged, "files": out, "train_videos": len({r[2] for r in train}), "train_rows": len(train),
            "test_videos": len({r[2] for r in test}), "test_rows": len(test),
            "summary": f"train: {_counts(train)} -> {out['train']}\ntest: {_counts(test)} -> {out['test']}"}


def main(argv: Optional[list[str]] = None) -> int:
    p = OneLineArgumentParser(prog=PROG, description="A video-disjoint train/test split of an annotation file.")
    p.add_argument("annotations", help=".csv, .tsv or .jsonl with a 'video' column")
    p.add_argument("--out_dir", required=True, help="where train.<ext> and test.<ext> are written")
    p.add_argument("--test_fraction", type=finite_float, default=0.2, help="share of the video files in the test split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video_root", default=None,
                   help="the folder relative 'video' paths are relative to (training's --features_path; "
                        "default: --out_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace a different split already in --out_dir")
    args = p.parse_args(argv)
    try:
        result = split_annotations(args.annotations, args.out_dir, args.test_fraction, args.seed,
                                   args.video_root, args.overwrite)
    except (AnnotationError, OutputWriteError) as exc:  # SplitError is an AnnotationError
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    print(result["summary"] + ("\n(the same split was already there; nothing written)" if result["unchanged"]
                               else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
