#!/usr/bin/env python
"""Metrics of a saved test similarity matrix, with the DSL re-scored metrics next to them.

    python -m analysis.evaluate_sim_matrix --sim_matrix runs/eval/msrvtt_sim_matrix.npy --dsl

--sim_matrix: test captions x test videos (.npy, as written by ``main.py --save_sim_matrix``: logits,
100 x cosine). Multi-sentence test sets (VATEX, MSVD): --caption_video_index names the video of every
caption (default: ``<dataset>_caption_video_index.npy`` next to the matrix when it exists; otherwise
caption i <-> video i). DSL (see modules/metrics.py): S * softmax(S / T, dim=captions), T = --dsl_temperature
(1, as TS2-Net and T-MASS compute it); it uses every test query at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    from runtime.errors import OneLineArgumentParser, finite_float

    p = OneLineArgumentParser(prog="python -m analysis.evaluate_sim_matrix", description="Retrieval metrics of a saved similarity matrix (optionally with DSL)")
    p.add_argument("--sim_matrix", required=True, help="test captions x test videos (.npy)")
    p.add_argument("--caption_video_index", default=None,
                   help="video index of every caption (.npy); default: <name>_caption_video_index.npy next to "
                        "the matrix (the prefix of *_sim_matrix.npy), else the diagonal")
    p.add_argument("--dsl", action="store_true", help="also report the DSL re-scored metrics")
    p.add_argument("--dsl_temperature", type=finite_float, default=1.0, help="DSL softmax temperature (on the logits)")
    p.add_argument("--json", default=None, help="also write the metrics here")
    return p


def _default_index_path(sim_path: str) -> str | None:
    if not sim_path.endswith("_sim_matrix.npy"):
        return None
    path = sim_path[:-len("_sim_matrix.npy")] + "_caption_video_index.npy"
    return path if os.path.isfile(path) else None


def _read_array(parser, path: str, flag: str) -> np.ndarray:
    """One array of a .npy file (no pickled objects), or one line naming the file."""
    from runtime.errors import first_line

    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        parser.error(f"{flag} {path}: not a readable .npy array ({first_line(exc)})")
    if not isinstance(array, np.ndarray):  # an .npz archive (or a checkpoint, which is a zip file)
        parser.error(f"{flag} {path}: not a .npy array (an .npz or zip archive)")
    return array


def read_score_matrix(parser, path: str, flag: str) -> np.ndarray:
    """A 2-D matrix of finite real scores from a .npy file, or one line naming the flag, the file and (for a
    score that is not finite) its row and column."""
    if not os.path.isfile(path):
        parser.error(f"{flag} file not found: {path}")
    sim = _read_array(parser, path, flag)
    if sim.ndim != 2:
        parser.error(f"{flag} {path} must be a 2-D matrix, got shape {sim.shape}")
    if not np.issubdtype(sim.dtype, np.number) or np.issubdtype(sim.dtype, np.complexfloating):
        parser.error(f"{flag} {path} must hold real similarities, got {sim.dtype}")
    bad = np.argwhere(~np.isfinite(sim))
    if len(bad):
        r, c = (int(x) for x in bad[0])
        parser.error(f"{flag} {path} row {r} column {c} is {sim[r, c]} ({len(bad)} entries are not finite): the "
                     f"similarities must be finite numbers")
    return sim


def _load_inputs(parser, args):
    sim = read_score_matrix(parser, args.sim_matrix, "--sim_matrix")
    index_path = args.caption_video_index or _default_index_path(args.sim_matrix)
    index = None
    if index_path is not None:
        if not os.path.isfile(index_path):
            parser.error(f"--caption_video_index file not found: {index_path}")
        index = _read_array(parser, index_path, "--caption_video_index")
        if not np.issubdtype(index.dtype, np.number) or not np.all(np.isfinite(index)) or np.any(index % 1):
            parser.error(f"--caption_video_index {index_path} must hold video numbers (integers), got {index.dtype}")
        index = index.astype(np.int64).reshape(-1)
        if index.size != sim.shape[0] or (index.size and (index.min() < 0 or index.max() >= sim.shape[1])):
            parser.error(f"{index_path}: needs one video index in 0..{sim.shape[1] - 1} per caption "
                         f"({sim.shape[0]}), got {index.size} entries")
        if np.array_equal(index, np.arange(sim.shape[0])) and sim.shape[0] == sim.shape[1]:
            index = None
    elif sim.shape[0] != sim.shape[1]:
        parser.error(f"--sim_matrix is {sim.shape[0]} x {sim.shape[1]}: a multi-sentence matrix needs "
                     "--caption_video_index")
    return sim, index, index_path


def main(argv=None) -> int:
    from modules.metrics import DSL_LABEL, dsl_metrics, format_metrics, metrics_from_ranks, retrieval_ranks

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dsl_temperature <= 0:
        parser.error("--dsl_temperature must be > 0")
    sim, index, index_path = _load_inputs(parser, args)
    n_videos = sim.shape[1]
    ranks = retrieval_ranks(sim, index, n_videos if index is not None else None)
    out = {"t2v": metrics_from_ranks(ranks["t2v"]), "v2t": metrics_from_ranks(ranks["v2t"])}
    print(f"{sim.shape[0]} captions x {n_videos} videos" + (f" (captions' videos: {index_path})"
                                                           if index is not None else ""))
    print("Text-to-Video: " + format_metrics(out["t2v"]))
    print("Video-to-Text: " + format_metrics(out["v2t"], prefix="V2T "))
    if args.dsl:
        out["dsl"] = dsl_metrics(sim, index, n_videos if index is not None else None, args.dsl_temperature)
        print(f"{DSL_LABEL}, temperature {args.dsl_temperature:g}:")
        print("DSL Text-to-Video: " + format_metrics(out["dsl"]["t2v"]))
        print("DSL Video-to-Text: " + format_metrics(out["dsl"]["v2t"], prefix="V2T "))
    if args.json:
        from runtime.files import atomic_write_text
        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
