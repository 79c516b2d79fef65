"""One evaluation pass: every test caption against every test video (and the features it encodes)."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dataloaders.frame_cache import FrameCacheUse, describe_use
from modules.order import format_order, frame_orders, order_metrics, reorder_frames, tie_tolerance
from modules.metrics import DSL_LABEL, dsl_metrics, format_metrics, metrics_from_ranks, retrieval_ranks
from training import distributed as D
from runtime.logs import LOGGER_NAME
from runtime.precision import Precision

log = logging.getLogger(LOGGER_NAME)


def unwrap(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def frame_cache_counts(cache_use: FrameCacheUse, device) -> dict | None:
    """The pass's frame cache hits and misses summed over the processes; None without a cache. Every
    process calls it (a collective), whatever it counted."""
    hits = int(D.all_reduce_sum(cache_use.hits, device))
    misses = int(D.all_reduce_sum(cache_use.misses, device))
    return {"hits": hits, "misses": misses} if hits + misses else None


# ------------------------------------------------------------------------------------------ evaluation
def _shard(n: int) -> list[int]:
    rank, world = D.get_rank(), D.get_world_size()
    return list(range(rank, n, world))


def _loader(dataset, batch_size: int, workers: int, device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=workers,
                      pin_memory=device.type == "cuda")


@torch.no_grad()
def encode_texts(core, text_dataset, batch_size, workers, device, precision, progress=True, desc="text"):
    """Features of every caption (all processes share the work); returns (N, D) float32 CPU in order."""
    idx = _shard(len(text_dataset))
    feats, order = [], []
    it = _loader(Subset(text_dataset, idx), batch_size, workers, device)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"eval {desc}", leave=False, dynamic_ncols=True)
    for batch in it:
        with precision.eval_autocast():
            f = core.encode_text(batch["input_ids"].to(device))
        feats.append(f.float())
        order.append(torch.as_tensor(batch.get("caption_index", torch.zeros(0))).to(device).long())
    return _gather_in_order(feats, order, idx, device)


@torch.no_grad()
def encode_videos(core, video_dataset, batch_size, workers, device, precision, progress=True, desc="video",
                  cache_use: FrameCacheUse | None = None, with_reversed: bool = False):
    """Features of every video, each computed once; returns ((N, D) float32 CPU, sorted indices of the
    videos flagged unreadable, which the caller leaves out). ``cache_use`` counts the frame cache's hits.
    ``with_reversed``: a third item, the features of every video with its valid frames in reverse order
    (the order metric; the frames are read once)."""
    idx = _shard(len(video_dataset))
    feats, order, unreadable, reversed_feats = [], [], [], []
    it = _loader(Subset(video_dataset, idx), batch_size, workers, device)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"eval {desc}", leave=False, dynamic_ncols=True)
    for batch in it:
        if "unreadable" in batch:
            flags = torch.as_tensor(batch["unreadable"]).bool()
            unreadable += torch.as_tensor(batch["video_index"])[flags].tolist()
        if cache_use is not None:
            cache_use.update(batch)
        with precision.eval_video_autocast():
            f = core.encode_video(batch["video"].to(device), batch["video_mask"].to(device))
            if with_reversed:
                backwards = reorder_frames(batch["video"], frame_orders(batch["video_mask"], "reverse"))
                reversed_feats.append(core.encode_video(backwards.to(device), batch["video_mask"].to(device)).float())
        feats.append(f.float())
        order.append(torch.as_tensor(batch.get("video_index", torch.zeros(0))).to(device).long())
    out = _gather_in_order(feats, order, idx, device)
    unreadable = sorted(D.all_gather_list(unreadable))
    if with_reversed:
        return out, unreadable, _gather_in_order(reversed_feats, order, idx, device)
    return out, unreadable


def _gather_in_order(feats, order, idx, device) -> torch.Tensor:
    if feats:
        f = torch.cat(feats, 0)
        o = torch.cat(order, 0)
        if o.numel() != f.shape[0]:  # dataset without index fields: use the shard's order
            o = torch.as_tensor(idx, device=device, dtype=torch.long)
    else:
        f = torch.zeros((0, 0), device=device)
        o = torch.zeros((0,), device=device, dtype=torch.long)
    if D.get_world_size() > 1:
        dim = torch.tensor([f.shape[1] if f.numel() else 0], device=device)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
        if f.numel() == 0:
            f = torch.zeros((0, int(dim.item())), device=device)
        f = D.all_gather_rows(f.contiguous())
        o = D.all_gather_rows(o.contiguous())
    f, o = f.cpu(), o.cpu()
    out = torch.empty_like(f)
    out[o] = f
    return out


@torch.no_grad()
def similarity_matrix(core, text_feats: torch.Tensor, video_feats: torch.Tensor, device,
                      chunk: int = 1024) -> np.ndarray:
    """(num_texts, num_videos) float32 similarities, computed ``chunk`` texts at a time."""
    out = np.empty((text_feats.shape[0], video_feats.shape[0]), dtype=np.float32)
    v = video_feats.to(device)
    for s in range(0, text_feats.shape[0], chunk):
        out[s:s + chunk] = core.similarity(text_feats[s:s + chunk].to(device), v).float().cpu().numpy()
    return out


def evaluate(model, test_dataset, *, batch_size: int, workers: int, device, precision: Precision,
             progress: bool = True, chunk: int = 1024, dsl: bool = False, dsl_temperature: float = 1.0,
             order_metric: bool = False) -> dict:
    """Text-to-video and video-to-text metrics on a test dataset (every caption against every video).

    Returns dict(t2v, v2t, sim (np.ndarray, main process), ranks (0-based rank of the ground truth per
    caption / per video, main process), text_features, video_features, time, ...); with ``dsl`` also
    ``dsl`` = dict(t2v, v2t, temperature) of the dual-softmax re-scored matrix (next to the plain metrics);
    with ``order_metric`` also ``order`` (see :func:`order_metrics`).
    """
    core = unwrap(model)
    was_training = core.training
    core.eval()
    t0 = time.time()
    show = progress and D.is_main_process()
    cache_use = FrameCacheUse()
    encoded = encode_videos(core, test_dataset.video_dataset(), batch_size, workers, device, precision, show,
                            cache_use=cache_use, with_reversed=order_metric)
    video_feats, unreadable = encoded[:2]
    reversed_feats = encoded[2] if order_metric else None
    text_feats = encode_texts(core, test_dataset.text_dataset(), batch_size, workers, device, precision, show)
    cap_idx = torch.as_tensor(test_dataset.caption_video_index).long()
    twins = list(getattr(test_dataset, "order_twins", None) or [None] * len(cap_idx))
    if unreadable:  # left out with their captions (--skip_bad_videos), never replaced
        if reversed_feats is not None:
            keep = torch.ones(reversed_feats.shape[0], dtype=torch.bool)
            keep[unreadable] = False
            reversed_feats = reversed_feats[keep]
        dropped = set(unreadable)
        twins = [t for t, v in zip(twins, cap_idx.tolist()) if v not in dropped]
        text_feats, video_feats, cap_idx = _without_videos(text_feats, video_feats, cap_idx, unreadable)
    result = {"num_captions": int(text_feats.shape[0]), "num_videos": int(video_feats.shape[0]),
              "unreadable_videos": unreadable, "captions_left_out": int(len(test_dataset.caption_video_index)
                                                                        - text_feats.shape[0]),
              "caption_video_index": cap_idx.numpy(),
              "text_features": text_feats, "video_features": video_feats,
              "frame_cache": frame_cache_counts(cache_use, device)}
    if D.is_main_process():
        sim = similarity_matrix(core, text_feats, video_feats, device, chunk)
        multi = not torch.equal(cap_idx, torch.arange(sim.shape[0])) or sim.shape[0] != sim.shape[1]
        groups = (cap_idx, result["num_videos"]) if multi else (None, None)
        ranks = retrieval_ranks(sim, *groups)
        result.update(sim=sim, ranks=ranks, t2v=metrics_from_ranks(ranks["t2v"]),
                      v2t=metrics_from_ranks(ranks["v2t"]), multi_sentence=multi)
        if dsl:
            result["dsl"] = dsl_metrics(sim, *groups, temperature=dsl_temperature, return_ranks=True)
        if order_metric:
            twin_feats = None
            if any(t is not None for t in twins):
                twin_feats = encode_twin_captions(core, test_dataset, twins, batch_size, device, precision)
            result["order"] = order_metrics(core, text_feats, video_feats, reversed_feats, cap_idx, twin_feats,
                                            tie_tolerance(precision.eval_video_dtype))
    result = _share_metrics(result)
    result["time"] = time.time() - t0
    if was_training:
        core.train()
    return result


@torch.no_grad()
def encode_twin_captions(core, test_dataset, twins: list, batch_size: int, device, precision) -> torch.Tensor:
    """(N, D) features of each caption's order-swapped twin (``order_twin`` column); NaN rows for none."""
    rows = [i for i, t in enumerate(twins) if t]
    dim = None
    feats = {}
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        ids = torch.stack([test_dataset.encode_text(twins[i]) for i in part]).to(device)
        with precision.eval_autocast():
            f = core.encode_text(ids).float().cpu()
        dim = f.shape[1]
        feats.update(zip(part, f))
    out = torch.full((len(twins), dim or 1), float("nan"))
    for i, f in feats.items():
        out[i] = f
    return out


def _without_videos(text_feats, video_feats, cap_idx, drop: list[int]):
    """The features and caption->video links without the videos ``drop`` and their captions."""
    keep_video = torch.ones(video_feats.shape[0], dtype=torch.bool)
    keep_video[drop] = False
    new_index = torch.cumsum(keep_video.long(), 0) - 1
    keep_caption = keep_video[cap_idx]
    return text_feats[keep_caption], video_feats[keep_video], new_index[cap_idx[keep_caption]]


def _share_metrics(result: dict) -> dict:
    if D.get_world_size() == 1:
        return result
    shared = D.broadcast_object({k: result.get(k) for k in ("t2v", "v2t", "multi_sentence", "dsl", "order")})
    result.update(shared)
    return result


def log_eval(result: dict, header: str) -> None:
    log.info("%s: %d captions x %d videos%s (%.1fs)", header, result["num_captions"], result["num_videos"],
             " (multi-sentence)" if result.get("multi_sentence") else "", result.get("time", 0.0))
    log.info("Text-to-Video: %s", format_metrics(result["t2v"]))
    log.info("Video-to-Text: %s", format_metrics(result["v2t"], prefix="V2T "))
    if result.get("dsl"):
        log.info("%s, temperature %g:", DSL_LABEL, result["dsl"]["temperature"])
        log.info("DSL Text-to-Video: %s", format_metrics(result["dsl"]["t2v"]))
        log.info("DSL Video-to-Text: %s", format_metrics(result["dsl"]["v2t"], prefix="V2T "))
    described = describe_use(result.get("frame_cache"), "evaluation")
    if described:
        log.log(*described)
    if result.get("order"):
        log.info("Order: %s", format_order(result["order"]))
    if result.get("unreadable_videos"):
        log.warning("%d test videos could not be decoded and were left out with their %d captions "
                    "(--skip_bad_videos): these metrics are not comparable to those on the full test set",
                    len(result["unreadable_videos"]), result["captions_left_out"])

