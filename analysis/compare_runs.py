"""Compare two evaluations query by query.

    python -m analysis.compare_runs RUN_A RUN_B [--top 10] [--dsl] [--json diff.json]

RUN_A / RUN_B: a run folder (its last evaluation's ``ranks_*.json``, as results.json names it) or a
ranks file. Both must rank the same test set (same captions and videos, in the same order). Prints, per
direction, the metrics of both, how many queries got better, worse or kept their rank, how many moved
into or out of R@1, how many captions changed their top-1 video, and the queries whose rank changed most
(with their captions).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from modules.metrics import metrics_from_ranks


def _direction_diff(a: dict, b: dict, top: int) -> dict:
    ra = np.asarray(a["rank"], dtype=np.int64)
    rb = np.asarray(b["rank"], dtype=np.int64)
    delta = rb - ra
    # largest moves first: by the change of log-rank (a move 1 -> 3 matters more than 501 -> 503), then by size
    move = np.abs(np.log(rb) - np.log(ra))
    order = np.lexsort((-np.abs(delta), -move))
    changed = order[delta[order] != 0][:top]
    return {
        "num_queries": int(ra.size),
        "metrics_a": metrics_from_ranks(ra - 1), "metrics_b": metrics_from_ranks(rb - 1),
        "same_rank": int(np.sum(delta == 0)), "better_in_b": int(np.sum(delta < 0)),
        "worse_in_b": int(np.sum(delta > 0)),
        "r1_gained": int(np.sum((ra > 1) & (rb == 1))), "r1_lost": int(np.sum((ra == 1) & (rb > 1))),
        "most_changed": [{"query": int(i), "rank_a": int(ra[i]), "rank_b": int(rb[i])} for i in changed],
    }


def _check_same_test_set(a: dict, b: dict) -> None:
    for key in ("num_captions", "num_videos"):
        if a[key] != b[key]:
            raise ValueError(f"the runs rank different test sets: {key} {a[key]} ({a['path']}) vs "
                             f"{b[key]} ({b['path']})")
    if a.get("video_ids") and b.get("video_ids") and a["video_ids"] != b["video_ids"]:
        raise ValueError("the runs rank different videos (video ids differ)")
    if a["t2v"].get("video") != b["t2v"].get("video"):
        raise ValueError("the runs pair captions with videos differently")
    ca, cb = a["t2v"].get("caption"), b["t2v"].get("caption")
    if ca and cb and ca != cb:
        raise ValueError("the runs rank different captions")


def compare(a: dict, b: dict, top: int = 10, dsl: bool = False) -> dict:
    """Differences between two loaded ranks records (see :func:`analysis.query_ranks.load_query_ranks`)."""
    _check_same_test_set(a, b)
    if dsl:
        if "dsl" not in a or "dsl" not in b:
            raise ValueError("--dsl: both runs must have been evaluated with --dsl")
        a, b = dict(a, **a["dsl"]), dict(b, **b["dsl"])
    out = {"a": a["path"], "b": b["path"], "dsl": dsl}
    for direction in ("t2v", "v2t"):
        out[direction] = _direction_diff(a[direction], b[direction], top)
    if not dsl:
        ta, tb = np.asarray(a["t2v"]["top1"]), np.asarray(b["t2v"]["top1"])
        out["t2v"]["top1_changed"] = int(np.sum(ta != tb))
    _annotate(out, a)
    return out


def _annotate(out: dict, a: dict) -> None:
    captions, videos = a["t2v"].get("caption"), a.get("video_ids")
    gt = a["t2v"].get("video")
    for q in out["t2v"]["most_changed"]:
        if gt is not None:
            q["video"] = videos[gt[q["query"]]] if videos else gt[q["query"]]
        if captions:
            q["caption"] = captions[q["query"]]
    for q in out["v2t"]["most_changed"]:
        q["video"] = videos[q["query"]] if videos else q["query"]


def _fmt_metrics(m: dict) -> str:
    return f"R@1 {m['R1']:.1f}  R@5 {m['R5']:.1f}  R@10 {m['R10']:.1f}  MdR {m['MR']:.1f}  MnR {m['MeanR']:.1f}"


def format_report(diff: dict) -> str:
    lines = [f"A: {diff['a']}", f"B: {diff['b']}" + ("   (DSL ranks)" if diff["dsl"] else "")]
    names = {"t2v": "Text-to-video (one query per caption)", "v2t": "Video-to-text (one query per video)"}
    for direction in ("t2v", "v2t"):
        d = diff[direction]
        n = d["num_queries"]
        lines += ["", f"{names[direction]}: {n} queries",
                  f"  A: {_fmt_metrics(d['metrics_a'])}", f"  B: {_fmt_metrics(d['metrics_b'])}",
                  f"  rank: same {d['same_rank']}, better in B {d['better_in_b']}, worse in B {d['worse_in_b']}",
                  f"  R@1: {d['r1_gained']} queries gained, {d['r1_lost']} lost "
                  f"(net {d['r1_gained'] - d['r1_lost']:+d}, {100.0 * (d['r1_gained'] - d['r1_lost']) / n:+.2f} R@1)"]
        if "top1_changed" in d:
            lines.append(f"  top-1 video changed for {d['top1_changed']} captions")
        if d["most_changed"]:
            lines.append("  most changed (rank A -> rank B):")
            for q in d["most_changed"]:
                text = f" {q['caption']!r}" if q.get("caption") else ""
                lines.append(f"    #{q['query']:<6} video {q.get('video')}: {q['rank_a']} -> {q['rank_b']}{text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from runtime.errors import OneLineArgumentParser

    p = OneLineArgumentParser(prog="python -m analysis.compare_runs",
                              description="Compare two runs' per-query ranks (ranks_*.json)")
    p.add_argument("run_a", help="run folder or ranks_*.json")
    p.add_argument("run_b", help="run folder or ranks_*.json")
    p.add_argument("--top", type=int, default=10, help="list this many most-changed queries per direction")
    p.add_argument("--dsl", action="store_true", help="compare the DSL ranks (runs evaluated with --dsl)")
    p.add_argument("--json", default=None, help="also write the comparison here")
    return p


def main(argv=None) -> int:
    from analysis.query_ranks import load_query_ranks
    from runtime.errors import first_line

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 0:
        parser.error("--top must be >= 0")
    try:
        a, b = load_query_ranks(args.run_a), load_query_ranks(args.run_b)
        diff = compare(a, b, top=args.top, dsl=args.dsl)
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(first_line(e))
    print(format_report(diff))
    if args.json:
        from runtime.files import atomic_write_text
        atomic_write_text(args.json, json.dumps(diff, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
