"""Per-query ranks of an evaluation: ``<output_dir>/ranks_<tag><epoch>.json``.

For every caption (text-to-video) the 1-based rank of its ground-truth video and the video ranked
first; for every video (video-to-text) the rank of its best-ranked caption group (the protocol of
modules/metrics.py). With ``--dsl`` the DSL ranks are stored too. Lists are stored column-wise
(index i of every list is query i). ``python -m analysis.compare_runs`` compares two such files.
"""
from __future__ import annotations

import json
import os

import numpy as np

FORMAT = "dgl-query-ranks/1"


def ranks_filename(tag: str, epoch: int) -> str:
    return f"ranks_{tag}{epoch}.json"


def _top1(sim) -> list[int]:
    """Index of the best video of every caption (the lowest index among equal scores, as the ranks count)."""
    return np.argmax(np.nan_to_num(np.asarray(sim), nan=-np.inf), axis=1).tolist()


def _one_based(ranks) -> list[int]:
    return (np.asarray(ranks, dtype=np.int64) + 1).tolist()


def _evaluated_rows(res: dict, test_dataset):
    """(video ids, captions, video of each caption) of the rows ``res`` ranks: without the test videos that
    failed to decode in this evaluation (``res["unreadable_videos"]``) and their captions."""
    dropped = set(res.get("unreadable_videos") or [])
    videos = getattr(test_dataset, "videos", None)
    video_ids = [getattr(v, "video_id", None) for v in videos] if isinstance(videos, (list, tuple)) else None
    if video_ids is not None:
        video_ids = [vid for i, vid in enumerate(video_ids) if i not in dropped]
    captions = getattr(test_dataset, "captions", None)
    if captions is not None:
        full_index = np.asarray(test_dataset.caption_video_index).tolist()
        captions = [c for c, v in zip(captions, full_index) if v not in dropped]
    links = res.get("caption_video_index")
    if links is None:
        links = test_dataset.caption_video_index
    return video_ids, captions, np.asarray(links).astype(np.int64).tolist()


def build_ranks_record(res: dict, test_dataset, tag: str, epoch: int, global_step: int) -> dict:
    """The JSON content for an ``evaluate`` result (main process: it needs ``sim`` and ``ranks``)."""
    video_ids, captions, links = _evaluated_rows(res, test_dataset)
    record = {
        "format": FORMAT, "tag": tag, "epoch": epoch, "global_step": global_step, "rank_base": 1,
        "num_captions": int(res["num_captions"]), "num_videos": int(res["num_videos"]),
        "multi_sentence": bool(res.get("multi_sentence")),
        "video_ids": video_ids if video_ids and None not in video_ids else None,
        "t2v": {"rank": _one_based(res["ranks"]["t2v"]),
                "video": links,
                "top1": _top1(res["sim"]),
                "caption": list(captions) if captions is not None else None},
        "v2t": {"rank": _one_based(res["ranks"]["v2t"])},
    }
    dsl = res.get("dsl")
    if dsl and "ranks" in dsl:
        record["dsl"] = {"temperature": dsl["temperature"], "t2v": {"rank": _one_based(dsl["ranks"]["t2v"])},
                         "v2t": {"rank": _one_based(dsl["ranks"]["v2t"])}}
    return record


def write_query_ranks(out_dir: str, res: dict, test_dataset, tag: str, epoch: int, global_step: int) -> str:
    """Write the per-query ranks of ``res`` atomically; returns the file name (relative to ``out_dir``)."""
    from runtime.files import atomic_write_text

    name = ranks_filename(tag, epoch)
    record = build_ranks_record(res, test_dataset, tag, epoch, global_step)
    atomic_write_text(os.path.join(out_dir, name), json.dumps(record, separators=(",", ":")) + "\n")
    return name


def evaluation_extras(res: dict) -> dict:
    """What an evaluation adds to its results.json entry: the DSL metrics (with --dsl) and the ranks file."""
    extras = {}
    if res.get("dsl"):
        extras["dsl"] = {k: v for k, v in res["dsl"].items() if k != "ranks"}
    if res.get("ranks_file"):
        extras["ranks_file"] = res["ranks_file"]
    return extras


def load_query_ranks(path: str) -> dict:
    """A ranks file, or the last evaluation's ranks file of a run folder (results.json names it)."""
    if os.path.isdir(path):
        path = _latest_ranks_file(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"ranks file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a per-query ranks file ({FORMAT}): not UTF-8 text") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a per-query ranks file ({FORMAT})")
    record["path"] = path
    return record


def _latest_ranks_file(run_dir: str) -> str:
    results = os.path.join(run_dir, "results.json")
    if os.path.isfile(results):
        with open(results, "r", encoding="utf-8") as f:
            evaluations = json.load(f).get("evaluations") or []
        named = [e["ranks_file"] for e in evaluations if e.get("ranks_file")]
        if named:
            return os.path.join(run_dir, named[-1])
    found = sorted((n for n in os.listdir(run_dir) if n.startswith("ranks_") and n.endswith(".json")),
                   key=lambda n: os.path.getmtime(os.path.join(run_dir, n)))
    if not found:
        raise FileNotFoundError(f"no per-query ranks file (ranks_*.json) in {run_dir}")
    return os.path.join(run_dir, found[-1])
