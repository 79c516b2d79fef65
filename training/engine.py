"""One training epoch and one evaluation pass."""
from __future__ import annotations

import contextlib
import logging
import math
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from dataloaders.frame_cache import FrameCacheUse, describe_use
from modules.order import format_order, frame_orders, order_metrics, reorder_frames, tie_tolerance
from modules.metrics import DSL_LABEL, dsl_metrics, format_metrics, metrics_from_ranks, retrieval_ranks
from training import distributed as D
from training.gradcache import gradcache_step
from runtime.logs import LOGGER_NAME
from runtime.precision import Precision

log = logging.getLogger(LOGGER_NAME)


# ------------------------------------------------------------------------------------------ precision
def unwrap(model):
    return model.module if hasattr(model, "module") else model


def logit_scale_value(model) -> float | None:
    core = unwrap(model)
    for owner in (core, getattr(core, "clip", None)):
        ls = getattr(owner, "logit_scale", None) if owner is not None else None
        if isinstance(ls, torch.Tensor):
            return float(ls.detach().float().exp())
    return None


def _to(batch: dict, device) -> dict:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ training
def forward_backward(model, input_ids, video, video_mask, *, autocast, scale_loss,
                     contrastive_chunk_size: int = 0, sync_grads: bool = True,
                     frame_order: torch.Tensor | None = None, order_weight: float = 1.0) -> torch.Tensor:
    """One micro-batch's loss and backward pass; returns the (unscaled) loss.

    The plain step, or gradient caching (training/gradcache.py) when ``contrastive_chunk_size`` is
    smaller than the micro-batch: the same loss and gradients with that many samples encoded at a time.
    ``scale_loss`` maps the loss to what is back-propagated (accumulation share, AMP scaling).
    ``frame_order`` (n, T): order negatives (modules/order.py), None for the published loss.
    """
    order = {} if frame_order is None else {"frame_order": frame_order, "order_weight": order_weight}
    if 0 < contrastive_chunk_size < input_ids.shape[0]:
        return gradcache_step(model, input_ids, video, video_mask, contrastive_chunk_size, autocast=autocast,
                              scale_loss=scale_loss, sync_grads=sync_grads, **order)
    with autocast():
        out = model(input_ids, video, video_mask, **order)
        loss = out["loss"] if isinstance(out, dict) else out
    scale_loss(loss).backward()
    return loss


def apply_update(optimizer, scaler) -> None:
    """The optimiser's update from the accumulated gradients (through the GradScaler under CUDA AMP, which
    skips an update whose gradients are not finite), then the gradients are cleared."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model, loader, optimizer, schedule, precision: Precision, scaler, *, epoch: int,
                    global_step: int, accumulation: int, clip_grad_norm: float | None, n_display: int,
                    device, board=None, progress: bool = True, step_callback=None,
                    contrastive_chunk_size: int = 0, order_negatives=None) -> dict:
    """Train for one pass over ``loader``; returns dict(loss, global_step, replaced, steps, time).

    contrastive_chunk_size > 0 (smaller than the micro-batch): gradient caching (training/gradcache.py),
    the same loss and gradients with the encoders' activations of that many samples at a time.
    order_negatives: a modules.order.OrderNegatives (extra text-to-video negatives), or None.
    """
    model.train()
    core = unwrap(model)
    params = [p for _, p in core.trainable_parameters() if p.requires_grad]
    ddp = hasattr(model, "no_sync")
    n_batches = len(loader)
    usable = (n_batches // accumulation) * accumulation
    total_loss, n_loss, replaced, seen = 0.0, 0, 0, 0
    cache_use = FrameCacheUse()
    start = end = time.time()
    optimizer.zero_grad(set_to_none=True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=usable, desc=f"train epoch {epoch + 1}", leave=False, dynamic_ncols=True)
    lr = schedule.lr_at(global_step)

    def scale_loss(loss):  # what is back-propagated: the micro-batch's share, scaled for AMP
        return scaler.scale(loss / accumulation) if scaler is not None else loss / accumulation

    for i, batch in enumerate(loader):
        if i >= usable:  # an incomplete accumulation group at the end of the epoch is dropped
            break
        if "replaced" in batch:
            flags = torch.as_tensor(batch["replaced"])
            replaced += int(flags.sum())
            seen += int(flags.numel())
        cache_use.update(batch)
        frame_order = None if order_negatives is None else order_negatives.frame_order(batch, epoch)
        batch = _to(batch, device)
        data_time = time.time() - end
        if i % accumulation == 0:
            lr = schedule.apply(optimizer, global_step)
        update = (i + 1) % accumulation == 0
        sync = contextlib.nullcontext() if (update or not ddp) else model.no_sync()
        with sync:
            loss = forward_backward(model, batch["input_ids"], batch["video"], batch["video_mask"],
                                    autocast=precision.autocast, scale_loss=scale_loss,
                                    contrastive_chunk_size=contrastive_chunk_size, sync_grads=update,
                                    frame_order=None if frame_order is None else frame_order.to(device),
                                    order_weight=1.0 if order_negatives is None else order_negatives.weight)
            loss_value = float(loss.detach().float())
            if not math.isfinite(loss_value):
                if scaler is None:
                    raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1}, step {global_step}")
                log.warning("loss is %s at step %d; the AMP grad scaler skips this update", loss_value, global_step)
        total_loss += loss_value
        n_loss += 1
        if update:
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = None
            if clip_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
            apply_update(optimizer, scaler)
            global_step += 1
            batch_time = time.time() - end
            if step_callback is not None:
                step_callback(global_step, loss_value)
            if global_step % n_display == 0 and D.is_main_process():
                scale = logit_scale_value(model)
                log.info("Epoch %d [%d/%d] step %d loss %.4f lr %.3e logit_scale %s data %.3fs step %.3fs",
                         epoch + 1, i + 1, usable, global_step, loss_value, lr,
                         f"{scale:.3f}" if scale is not None else "n/a", data_time, batch_time)
            if board is not None:
                board.scalars({"loss": loss_value, "lr": lr, "logit_scale": logit_scale_value(model),
                               "data_time": data_time, "step_time": batch_time, "grad_norm": grad_norm},
                              global_step, prefix="train/")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        end = time.time()
    if bar is not None:
        bar.close()
    optimizer.zero_grad(set_to_none=True)
    replaced = int(D.all_reduce_sum(replaced, device))
    seen = int(D.all_reduce_sum(seen, device))
    return {"loss": total_loss / max(n_loss, 1), "global_step": global_step, "replaced": replaced,
            "samples": seen, "steps": usable // accumulation, "time": time.time() - start,
            "frame_cache": frame_cache_counts(cache_use, device)}


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

