#!/usr/bin/env python
"""Search the QB-norm beta that gives the best text-to-video R@1.

    python search_for_best_r1_with_qb_norm.py --dataset msrvtt \
        --sim_matrix out/msrvtt_sim_matrix.npy \
        --train_test_t2v out/msrvtt_train_test_t2v.npy --train_test_v2t out/msrvtt_train_test_v2t.npy

Inputs (.npy, rows = texts, columns = videos, as written by ``main.py --save_sim_matrix``):
  --sim_matrix      test texts x test videos (caption i <-> video i)
  --train_test_t2v  training texts x test videos (the text query bank)
  --train_test_v2t  test texts x training videos (transposed: the video query bank)
Without paths, the published file names qb_norm_sim_matrix/<dataset>_vit16_*.npy are used.
The last line printed is ``Best beta: <beta>, with R@1: <r1>``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    from training.config import OneLineArgumentParser

    p = OneLineArgumentParser(description="Search for the QB-norm beta with the best text-to-video R@1")
    p.add_argument("--dataset", default="msrvtt", type=str)
    p.add_argument("--sim_matrix", default=None, help="test x test similarity (.npy)")
    p.add_argument("--train_test_t2v", default=None, help="train texts x test videos (.npy)")
    p.add_argument("--train_test_v2t", default=None, help="test texts x train videos (.npy)")
    p.add_argument("--t2v_k", default=1, type=int)
    p.add_argument("--t2v_beta", default=0.87, type=float, help="beta for the first, fixed-beta report")
    p.add_argument("--t2v_theta", default=3, type=float)
    p.add_argument("--v2t_k", default=1, type=int)
    p.add_argument("--v2t_beta", default=0.87, type=float, help="beta for the first, fixed-beta report")
    p.add_argument("--v2t_theta", default=5, type=float)
    p.add_argument("--beta_min", default=0.5, type=float)
    p.add_argument("--beta_max", default=1.0, type=float)
    p.add_argument("--beta_step", default=0.01, type=float)
    p.add_argument("--log_file", default=None,
                   help="also append the log here (default: search_best_beta_<dataset>.log next to --sim_matrix)")
    return p


def _load(parser, path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        parser.error(f"{what} file not found: {path}")
    try:
        a = np.load(path)
    except Exception as e:  # noqa: BLE001 - reported as one line
        parser.error(f"cannot read {what} {path}: {e}")
    if a.ndim != 2:
        parser.error(f"{what} {path} must be a 2-D matrix, got shape {a.shape}")
    return a


def main(argv=None) -> int:
    from modules.metrics import compute_metrics, format_metrics
    from modules.qb_norm import beta_values, qb_norm, search_best_beta

    parser = build_parser()
    args = parser.parse_args(argv)
    default = os.path.join("qb_norm_sim_matrix", f"{args.dataset}_vit16_{{}}.npy")
    sim_path = args.sim_matrix or default.format("sim_matrix")
    t2v_path = args.train_test_t2v or default.format("train_test_t2v")
    v2t_path = args.train_test_v2t or default.format("train_test_v2t")
    if args.beta_step <= 0 or args.beta_max < args.beta_min:
        parser.error("need --beta_step > 0 and --beta_max >= --beta_min")
    if args.t2v_k < 1 or args.v2t_k < 1:
        parser.error("--t2v_k and --v2t_k must be >= 1")
    sim = _load(parser, sim_path, "--sim_matrix")
    t2v = _load(parser, t2v_path, "--train_test_t2v")
    v2t = _load(parser, v2t_path, "--train_test_v2t")
    if sim.shape[0] != sim.shape[1]:
        parser.error(f"--sim_matrix must be square (caption i <-> video i), got {sim.shape}")
    if t2v.shape[1] != sim.shape[1]:
        parser.error(f"--train_test_t2v has {t2v.shape[1]} columns, the test set has {sim.shape[1]} videos")
    if v2t.shape[0] != sim.shape[0]:
        parser.error(f"--train_test_v2t has {v2t.shape[0]} rows, the test set has {sim.shape[0]} texts")

    log_file = args.log_file or os.path.join(os.path.dirname(os.path.abspath(sim_path)),
                                             f"search_best_beta_{args.dataset}.log")
    logger = logging.getLogger("qb_norm_search")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    try:
        fh = logging.FileHandler(log_file, mode="a")
        fh.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        logger.addHandler(fh)
    except OSError:
        pass
    log = logger.info

    log(f"sim_matrix {sim.shape}, train_test_t2v {t2v.shape}, train_test_v2t {v2t.shape}")
    log("Without QB-norm:")
    log("Text-to-Video: " + format_metrics(compute_metrics(sim)))
    log("Video-to-Text: " + format_metrics(compute_metrics(sim.T), prefix="V2T "))
    log(f"With --t2v_beta {args.t2v_beta} / --v2t_beta {args.v2t_beta}:")
    log("Text-to-Video: " + format_metrics(compute_metrics(
        qb_norm(t2v, sim, args.t2v_k, args.t2v_beta, args.t2v_theta))))
    log("Video-to-Text: " + format_metrics(compute_metrics(
        qb_norm(v2t.T, sim.T, args.v2t_k, args.v2t_beta, args.v2t_theta)), prefix="V2T "))

    betas = beta_values(args.beta_min, args.beta_max, args.beta_step)
    best_beta, best_r1, _ = search_best_beta(t2v, v2t, sim, betas, t2v_k=args.t2v_k, t2v_theta=args.t2v_theta,
                                             v2t_k=args.v2t_k, v2t_theta=args.v2t_theta, log=log)
    shown = None if best_beta is None else float(f"{best_beta:.10g}")  # 0.7000000000000002 -> 0.7
    log(f"Best beta: {shown}, with R@1: {best_r1}")
    for h in list(logger.handlers):
        h.flush()
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
