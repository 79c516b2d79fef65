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

``--beta_selection`` (default ``test``, the published search) picks beta by the best *test* R@1.
``bank`` picks it by cross-validation on the query bank alone (needs --train_train: training texts x
training videos, and its ground truth --train_train_gt, both written by ``main.py --save_sim_matrix``)
and reports the test metrics once; ``both`` runs both and prints them side by side, so the part of the
gain that comes from choosing beta on the test labels is visible.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from analysis.evaluate_sim_matrix import read_score_matrix


def build_parser() -> argparse.ArgumentParser:
    from runtime.errors import OneLineArgumentParser, finite_float

    p = OneLineArgumentParser(description="Search for the QB-norm beta with the best text-to-video R@1")
    p.add_argument("--dataset", default="msrvtt", type=str)
    p.add_argument("--sim_matrix", default=None, help="test x test similarity (.npy)")
    p.add_argument("--train_test_t2v", default=None, help="train texts x test videos (.npy)")
    p.add_argument("--train_test_v2t", default=None, help="test texts x train videos (.npy)")
    p.add_argument("--t2v_k", default=1, type=int)
    p.add_argument("--t2v_beta", default=0.87, type=finite_float, help="beta for the first, fixed-beta report")
    p.add_argument("--t2v_theta", default=3, type=finite_float)
    p.add_argument("--v2t_k", default=1, type=int)
    p.add_argument("--v2t_beta", default=0.87, type=finite_float, help="beta for the first, fixed-beta report")
    p.add_argument("--v2t_theta", default=5, type=finite_float)
    p.add_argument("--beta_min", default=0.5, type=finite_float)
    p.add_argument("--beta_max", default=1.0, type=finite_float)
    p.add_argument("--beta_step", default=0.01, type=finite_float)
    p.add_argument("--beta_selection", default="test", choices=["test", "bank", "both"],
                   help="test: the published search (best test R@1); bank: cross-validation on the query bank "
                        "alone, then the test metrics once; both: the two side by side")
    p.add_argument("--train_train", default=None,
                   help="train texts x train videos (.npy) for --beta_selection bank/both "
                        "(default: <sim_matrix folder>/<dataset>_train_train_t2v.npy)")
    p.add_argument("--train_train_gt", default=None,
                   help="column of each --train_train row's video, -1 if none (.npy; default: the "
                        "--train_train name with _t2v.npy replaced by _gt.npy)")
    p.add_argument("--cv_folds", default=5, type=int, help="video-disjoint folds of the bank cross-validation")
    p.add_argument("--cv_gallery_size", default=None, type=int,
                   help="videos per cross-validation gallery (default: as many as the test set has)")
    p.add_argument("--cv_seed", default=0, type=int, help="seed of the fold split")
    p.add_argument("--log_file", default=None,
                   help="also append the log here (default: search_best_beta_<dataset>.log next to --sim_matrix)")
    return p


def check_bank_is_not_the_test(parser, bank, queries, bank_flag: str, bank_path: str, queries_what: str):
    """Refuse a bank whose rows include every test query's row of scores (the test matrix passed as the bank:
    QB-norm would normalise each test query with itself), one line naming the bank row; returns a note saying
    how many when only some are (None when none)."""
    from modules.qb_norm import bank_overlap, rows_of_queries

    found = rows_of_queries(bank, queries)
    overlap = bank_overlap([int(q) if q >= 0 else ("bank", b) for b, q in enumerate(found)], range(len(queries)))
    if not overlap["shared"]:
        return None
    b, q = overlap["shared"][0]
    if overlap["every_query"]:
        parser.error(f"{bank_flag} {bank_path} row {b} scores the test gallery as {queries_what} row {q} does, and "
                     f"so for every test query: the bank holds the test queries (is it the test matrix?); QB-norm "
                     f"needs a bank of other queries")
    return (f"note: {len(overlap['shared'])} rows of {bank_flag} (e.g. row {b}) score the test gallery as test "
            f"queries do ({queries_what} row {q}): those test queries are in the bank and their QB-norm scores are "
            f"optimistic")


def _shown(beta):
    return None if beta is None else float(f"{beta:.10g}")  # 0.7000000000000002 -> 0.7


def select_beta_on_bank(args, parser, sim_path, sim, betas, log):
    """Cross-validated beta on the training texts x training videos matrix (no test labels)."""
    from modules.qb_norm import cross_validate_beta

    folder = os.path.dirname(os.path.abspath(sim_path))
    tt_path = args.train_train or os.path.join(folder, f"{args.dataset}_train_train_t2v.npy")
    gt_path = args.train_train_gt or (tt_path[:-len("_t2v.npy")] + "_gt.npy" if tt_path.endswith("_t2v.npy")
                                      else os.path.splitext(tt_path)[0] + "_gt.npy")
    train_train = read_score_matrix(parser, tt_path, "--train_train")
    if not os.path.isfile(gt_path):
        parser.error(f"--train_train_gt file not found: {gt_path}")
    gt = np.load(gt_path)
    if gt.ndim != 1 or gt.shape[0] != train_train.shape[0]:
        parser.error(f"--train_train_gt {gt_path} must hold one entry per --train_train row "
                     f"({train_train.shape[0]}), got shape {gt.shape}")
    if gt.size and (gt.max() >= train_train.shape[1] or gt.min() < -1):
        parser.error(f"--train_train_gt {gt_path} has columns outside 0..{train_train.shape[1] - 1} (or < -1)")
    gallery = args.cv_gallery_size or sim.shape[1]
    log(f"Beta selection on the query bank: train_train {train_train.shape} ({tt_path})")
    try:
        beta, r1, _ = cross_validate_beta(train_train, gt, betas, k=args.t2v_k, theta=args.t2v_theta,
                                          num_folds=args.cv_folds, gallery_size=gallery, seed=args.cv_seed, log=log)
    except ValueError as e:
        parser.error(f"bank cross-validation: {e}")
    log(f"Bank-selected beta: {_shown(beta)} (cross-validated R@1 {r1:.3f})")
    return beta, r1


def _qb_row(args, label, beta, sim, t2v, v2t):
    from modules.qb_norm import qb_norm

    return (label, beta, qb_norm(t2v, sim, args.t2v_k, beta, args.t2v_theta),
            qb_norm(v2t.T, sim.T, args.v2t_k, beta, args.v2t_theta))


def _bank_row(args, bank_choice, sim, t2v, v2t):
    return _qb_row(args, f"query bank only ({args.cv_folds}-fold CV)", bank_choice[0], sim, t2v, v2t)


def log_selection_table(rows, log):
    """One line per beta choice: its test metrics in both directions (rows: label, beta, t2v, v2t matrices)."""
    from modules.metrics import compute_metrics

    log("QB-norm beta selection, test metrics (beta chosen on the test labels vs on the query bank alone):")
    log(f"  {'selection':<34} {'beta':>6} | {'T2V R@1':>7} {'R@5':>5} {'R@10':>5} {'MdR':>5} {'MnR':>6} | "
        f"{'V2T R@1':>7} {'R@5':>5} {'R@10':>5} {'MdR':>5} {'MnR':>6}")
    r1 = {}
    for label, beta, t2v_sim, v2t_sim in rows:
        tv, vt = compute_metrics(t2v_sim), compute_metrics(v2t_sim)
        r1[label] = tv["R1"]
        cells = " | ".join(f"{m['R1']:>7.2f} {m['R5']:>5.1f} {m['R10']:>5.1f} {m['MR']:>5.1f} {m['MeanR']:>6.1f}"
                           for m in (tv, vt))
        log(f"  {label:<34} {'-' if beta is None else f'{beta:.2f}':>6} | {cells}")
    plain, values = rows[0][0], list(r1.values())
    if len(rows) == 3:
        log(f"  text-to-video R@1 gain over no QB-norm: {values[1] - values[0]:+.2f} with the bank-selected beta, "
            f"{values[2] - values[0]:+.2f} with the test-selected beta ({values[2] - values[1]:+.2f} from selecting "
            f"on the test set)")
    else:
        log(f"  text-to-video R@1 gain over {plain}: {values[1] - values[0]:+.2f}")


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
    if args.cv_folds < 2 or (args.cv_gallery_size is not None and args.cv_gallery_size < 1):
        parser.error("need --cv_folds >= 2 and --cv_gallery_size >= 1")
    sim = read_score_matrix(parser, sim_path, "--sim_matrix")
    t2v = read_score_matrix(parser, t2v_path, "--train_test_t2v")
    v2t = read_score_matrix(parser, v2t_path, "--train_test_v2t")
    if sim.shape[0] != sim.shape[1]:
        parser.error(f"--sim_matrix must be square (caption i <-> video i), got {sim.shape}")
    if t2v.shape[1] != sim.shape[1]:
        parser.error(f"--train_test_t2v has {t2v.shape[1]} columns, the test set has {sim.shape[1]} videos")
    if v2t.shape[0] != sim.shape[0]:
        parser.error(f"--train_test_v2t has {v2t.shape[0]} rows, the test set has {sim.shape[0]} texts")
    notes = [check_bank_is_not_the_test(parser, t2v, sim, "--train_test_t2v", t2v_path, "--sim_matrix"),
             check_bank_is_not_the_test(parser, v2t.T, sim.T, "--train_test_v2t", v2t_path,
                                        "the transposed --sim_matrix")]
    notes = [n for n in notes if n]

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
    for note in notes:
        log(note)
    log("Without QB-norm:")
    log("Text-to-Video: " + format_metrics(compute_metrics(sim)))
    log("Video-to-Text: " + format_metrics(compute_metrics(sim.T), prefix="V2T "))
    log(f"With --t2v_beta {args.t2v_beta} / --v2t_beta {args.v2t_beta}:")
    log("Text-to-Video: " + format_metrics(compute_metrics(
        qb_norm(t2v, sim, args.t2v_k, args.t2v_beta, args.t2v_theta))))
    log("Video-to-Text: " + format_metrics(compute_metrics(
        qb_norm(v2t.T, sim.T, args.v2t_k, args.v2t_beta, args.v2t_theta)), prefix="V2T "))

    betas = beta_values(args.beta_min, args.beta_max, args.beta_step)
    bank_choice = None
    if args.beta_selection in ("bank", "both"):
        bank_choice = select_beta_on_bank(args, parser, sim_path, sim, betas, log)
    if args.beta_selection == "bank":
        rows = [("none (no QB-norm)", None, sim, sim.T), _bank_row(args, bank_choice, sim, t2v, v2t)]
        log_selection_table(rows, log)
        log(f"Bank-selected beta: {_shown(bank_choice[0])}, with R@1: {compute_metrics(rows[1][2])['R1']}")
    else:
        best_beta, best_r1, _ = search_best_beta(t2v, v2t, sim, betas, t2v_k=args.t2v_k, t2v_theta=args.t2v_theta,
                                                 v2t_k=args.v2t_k, v2t_theta=args.v2t_theta, log=log)
        if bank_choice is not None:
            log_selection_table([("none (no QB-norm)", None, sim, sim.T), _bank_row(args, bank_choice, sim, t2v, v2t),
                                 _qb_row(args, "test labels (best test R@1)", best_beta, sim, t2v, v2t)], log)
        log(f"Best beta: {_shown(best_beta)}, with R@1: {best_r1}")
    for h in list(logger.handlers):
        h.flush()
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
