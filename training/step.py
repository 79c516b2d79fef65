"""The training step, read top to bottom: a micro-batch's forward -> loss -> backward (gradient caching is
its one branch), the gradients summed over the processes, the optimiser step, then the epoch's loop
around them (batches, schedule, logging).

One optimiser step is ``--gradient_accumulation_steps`` micro-batches of ``batch_size / accumulation``
samples each; the contrastive loss sees one micro-batch (of every process), as in the published code.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time

import torch

from dataloaders.base import ReplacementCounter, describe_replacements
from dataloaders.frame_cache import FrameCacheUse, describe_use
from modules.order import OrderNegatives
from runtime.logs import LOGGER_NAME
from training import distributed as D
from training.evaluation import frame_cache_counts, unwrap
from training.gradcache import gradcache_step

log = logging.getLogger(LOGGER_NAME)


def forward_backward(model, input_ids, video, video_mask, *, autocast, scale_loss,
                     contrastive_chunk_size: int = 0, sync_grads: bool = True,
                     frame_order: torch.Tensor | None = None, order_weight: float = 1.0) -> torch.Tensor:
    """One micro-batch: forward -> loss -> backward; returns the (unscaled) loss.

    ``scale_loss`` maps the loss to what is back-propagated (the accumulation share, AMP scaling).
    ``sync_grads``: sum the gradients over the processes in this backward (the last micro-batch of an
    optimiser step). ``frame_order`` (n, T): order negatives (modules/order.py), None for the published loss.
    """
    order = {} if frame_order is None else {"frame_order": frame_order, "order_weight": order_weight}
    if 0 < contrastive_chunk_size < input_ids.shape[0]:
        # ---- GRADIENT CACHING (--contrastive_chunk_size, training/gradcache.py): the same loss and gradients
        # with the encoders' activations of that many samples in memory at a time. It encodes the unwrapped
        # model (DDP's reducer never runs) and sums the gradients over the processes itself.
        return gradcache_step(model, input_ids, video, video_mask, contrastive_chunk_size, autocast=autocast,
                              scale_loss=scale_loss, sync_grads=sync_grads, **order)
    # ---- the plain step: DDP sums the gradients during the backward, on the last micro-batch only
    no_sync = model.no_sync() if hasattr(model, "no_sync") and not sync_grads else contextlib.nullcontext()
    with no_sync:
        with autocast():
            out = model(input_ids, video, video_mask, **order)
            loss = out["loss"] if isinstance(out, dict) else out
        scale_loss(loss).backward()
    return loss


def optimizer_step(optimizer, scaler, clip_grad_norm: float | None = None, params=()) -> float | None:
    """The update from the gradients accumulated (and summed over the processes) since the last step, then
    the gradients are cleared. Returns the gradient norm before clipping (None without ``clip_grad_norm``)."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # the norm is clipped on the true gradients, not the AMP-scaled ones
    grad_norm = None
    if clip_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
    if scaler is not None:  # CUDA AMP: an update whose gradients are not finite is skipped
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_one_epoch(model, loader, optimizer, schedule, scaler, precision, args, *, epoch: int, global_step: int,
                    device, board=None, progress: bool = True, order_negatives: OrderNegatives | None = None,
                    step_losses: list | None = None) -> dict:
    """One pass over ``loader`` (micro-batches); returns dict(loss, global_step, replaced, samples, steps, time,
    frame_cache). ``args`` gives --gradient_accumulation_steps, --clip_grad_norm, --contrastive_chunk_size,
    --n_display and --epochs; ``step_losses`` gets (global step, loss) after every optimiser step."""
    accumulation = args.gradient_accumulation_steps
    model.train()
    params = [p for _, p in unwrap(model).trainable_parameters() if p.requires_grad]
    usable = (len(loader) // accumulation) * accumulation
    total_loss, n_loss = 0.0, 0
    replacements, cache_use = ReplacementCounter(), FrameCacheUse()
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
        # ---- the batch (a sample whose video failed to decode was replaced by the loader; counted)
        replacements.update(batch)
        cache_use.update(batch)
        frame_order = None if order_negatives is None else order_negatives.frame_order(batch, epoch)
        batch = {k: (v.to(device, non_blocking=device.type == "cuda") if isinstance(v, torch.Tensor) else v)
                 for k, v in batch.items()}
        data_time = time.time() - end
        # ---- the schedule: the lr of an optimiser step is set before its first micro-batch
        if i % accumulation == 0:
            lr = schedule.apply(optimizer, global_step)
        last_micro_batch = (i + 1) % accumulation == 0
        # ---- forward -> loss -> backward, the gradients summed over the processes on the last micro-batch
        loss = forward_backward(model, batch["input_ids"], batch["video"], batch["video_mask"],
                                autocast=precision.autocast, scale_loss=scale_loss,
                                contrastive_chunk_size=args.contrastive_chunk_size, sync_grads=last_micro_batch,
                                frame_order=None if frame_order is None else frame_order.to(device),
                                order_weight=1.0 if order_negatives is None else order_negatives.weight)
        loss_value = float(loss.detach().float())
        if not math.isfinite(loss_value):
            if scaler is None:
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1}, step {global_step}")
            log.warning("loss is %s at step %d; the AMP grad scaler skips this update", loss_value, global_step)
        total_loss += loss_value
        n_loss += 1
        if last_micro_batch:
            # ---- the optimiser step (AdamW; the GradScaler's under CUDA AMP), then logging
            grad_norm = optimizer_step(optimizer, scaler, args.clip_grad_norm, params)
            global_step += 1
            batch_time = time.time() - end
            if step_losses is not None:
                step_losses.append((global_step, loss_value))
            if global_step % args.n_display == 0 and D.is_main_process():
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
    stats = {"loss": total_loss / max(n_loss, 1), "global_step": global_step,
             "replaced": int(D.all_reduce_sum(replacements.replaced, device)),
             "samples": int(D.all_reduce_sum(replacements.seen, device)),
             "steps": usable // accumulation, "time": time.time() - start,
             "frame_cache": frame_cache_counts(cache_use, device)}
    _log_epoch(stats, epoch, args.epochs, board)
    return stats


def _log_epoch(stats: dict, epoch: int, epochs: int, board) -> None:
    log.info("epoch %d/%d finished: train loss %.4f, %d steps, %.1fs", epoch + 1, epochs, stats["loss"],
             stats["steps"], stats["time"])
    for described in (describe_replacements(stats["replaced"], stats["samples"], f"epoch {epoch + 1}"),
                      describe_use(stats.get("frame_cache"), f"epoch {epoch + 1} training")):
        if described:
            log.log(*described)
    if board is not None:
        board.scalars({"epoch_loss": stats["loss"], "bad_videos_replaced": stats["replaced"]},
                      stats["global_step"], prefix="train/")


def logit_scale_value(model) -> float | None:
    core = unwrap(model)
    for owner in (core, getattr(core, "clip", None)):
        ls = getattr(owner, "logit_scale", None) if owner is not None else None
        if isinstance(ls, torch.Tensor):
            return float(ls.detach().float().exp())
    return None


def order_negatives_from_flags(args, core) -> OrderNegatives | None:
    """--order_negatives: every training video also reversed or shuffled as a text-to-video negative."""
    kind = getattr(args, "order_negatives", "none") or "none"
    if kind == "none":
        return None
    negatives = OrderNegatives(kind, getattr(args, "order_negative_weight", 1.0), args.seed)
    log.info("order negatives: every training video also %s as a text-to-video negative, weight %g",
             "reversed" if negatives.kind == "reverse" else "shuffled (seeded, never in order)", negatives.weight)
    if getattr(getattr(core, "config", None), "shared_latent_space", None) == "linear":
        log.warning("--order_negatives with the linear latent space: its video features do not depend on the "
                    "frame order, so each copy scores like its own video (a negative equal to the positive); "
                    "use --shared_latent_space transformer")
    return negatives
