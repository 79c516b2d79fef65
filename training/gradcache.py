"""Exact large-batch contrastive training on less memory (gradient caching).

The symmetric InfoNCE loss couples every caption with every video of the global batch, so the usual
ways of saving memory (a smaller batch, gradient accumulation) change what is learnt: each part only
sees its own negatives. Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup") keeps the loss and its gradients exact while only one chunk of the
batch has its activations in memory:

1. features: the prompts are computed once (with their graph, they are small); every chunk of
   ``chunk_size`` samples is encoded without an autograd graph; the features of all processes are
   gathered.
2. loss: the loss over the gathered batch and its gradient with respect to every feature ((R*n, D),
   tiny). Every process computes the same loss and keeps the rows of its own samples.
3. encoders: each chunk is encoded again, now with its graph, and back-propagated with its feature
   gradients; the parameter gradients (and the prompts' gradients) add up over the chunks.
4. prompts: the gradient collected on the prompts flows once through the prompt generator.
5. processes: the parameter gradients are summed over the processes.

Why it equals the plain step: the gradient of the loss is the sum over samples of (dL/d feature) x
(d feature / d parameters), whatever the grouping of the samples. In the plain distributed path every
process computes the same global loss, the gradient-carrying gather sums the R identical copies of
each process's feature gradient (R x its share) and DDP then averages over the R processes: the
result is the plain sum, which is what step 5 computes (without DDP's reducer, which only runs after
a DDP forward; it never runs here).

Randomness: the encoders of DGL draw no random numbers (no dropout anywhere, CLIP and the prompt
transformer included; frame sampling happens in the data loader). So that a model that does draw
them still gets the gradients of the loss it reported, the random state of every chunk's first pass
is restored for its second pass, and the state after the step is the one after the first pass.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist

from modules.dgl import Prompts, contrastive_loss
from modules.order import order_column_bias, order_contrastive_loss, reorder_frames


def gradcache_step(model, ids: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor, chunk_size: int, *,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   sync_grads: bool = True, frame_order: torch.Tensor | None = None,
                   order_weight: float = 1.0) -> torch.Tensor:
    """Forward and backward of DGL's contrastive loss, encoding at most ``chunk_size`` samples at once.

    model: a DGL (or a DDP-wrapped one); ids (n, max_words), video (n, T, 3, H, W), video_mask (n, T):
    this process's samples. Gradients are added to the parameters' ``.grad``, as ``loss.backward()``
    would add them: equal (to float tolerance) to the plain step's over the batch of all processes.

    autocast: a factory of the autocast context the encoders run in (e.g. ``Precision.autocast``).
    scale_loss: maps the loss to what is back-propagated, e.g. ``lambda l: scaler.scale(l / accumulation)``
        (a GradScaler's scale, a gradient-accumulation divisor). Default: the loss itself.
    sync_grads: sum the gradients over the processes after the backward (with gradient accumulation,
        pass True only on the micro-batch before the optimiser step, like DDP's ``no_sync``).
    frame_order, order_weight: order negatives, as in ``DGL.forward``: the reordered copies are encoded
        with their videos, chunk by chunk, and their columns gathered like the others.
    Returns the loss (detached, fp32), the same value on every process.
    """
    core = model.module if hasattr(model, "module") else model
    autocast = autocast or contextlib.nullcontext
    n = ids.shape[0]
    if video.shape[0] != n or video_mask.shape[0] != n:
        raise ValueError(f"{n} captions but {video.shape[0]} videos and {video_mask.shape[0]} masks")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    device = video.device

    with autocast():
        prompts = core.prompts()
    leaves = Prompts(*(_detached_leaf(p) for p in prompts))

    if frame_order is not None:  # each video followed by its reordered copy: (n, 2, T, ...)
        video = torch.stack([video, reorder_frames(video, frame_order)], dim=1)
        video_mask = torch.stack([video_mask, video_mask], dim=1)
    text, vid, rng_states = _encode_without_graph(core, ids, video, video_mask, leaves, chunks, autocast)
    after_first_pass = _rng_state(device)
    bias = None if frame_order is None else order_column_bias(frame_order, order_weight)
    loss, text_grad, video_grad = _feature_gradients(core, text, vid, scale_loss, bias)
    _backward_through_encoders(core, ids, video, video_mask, leaves, chunks, rng_states, text_grad, video_grad,
                               autocast)
    _set_rng_state(after_first_pass, device)
    _backward_through_prompts(prompts, leaves)
    if sync_grads:
        sum_gradients_over_processes([p for p in core.parameters() if p.requires_grad])
    return loss


# ------------------------------------------------------------------------------------------ the steps
def _detached_leaf(p: torch.Tensor) -> torch.Tensor:
    # fp32 at least, so that the gradient summed over the chunks is not rounded to bf16/fp16 each time;
    # the forward is unchanged (the encoders cast the prompts to the backbone's dtype first).
    leaf = p.detach().to(torch.promote_types(p.dtype, torch.float32))
    return leaf.requires_grad_(p.requires_grad)


def _encode_without_graph(core, ids, video, video_mask, prompts, chunks, autocast):
    """Step 1: every chunk's features without a graph -> text (n, D), video (n, D), per-chunk RNG states."""
    text, vid, states = [], [], []
    with torch.no_grad():
        for s in chunks:
            states.append(_rng_state(video.device))
            with autocast():
                text.append(core.encode_text(ids[s], prompts))
                vid.append(_encode_videos(core, video[s], video_mask[s], prompts))
    return torch.cat(text), torch.cat(vid), states


def _encode_videos(core, video, video_mask, prompts):
    """(c, D) features of (c, T, ...) videos; (c, 2, D) of videos with their reordered copies (c, 2, T, ...)."""
    if video_mask.dim() == 2:
        return core.encode_video(video, video_mask, prompts)
    c = video.shape[0]
    feats = core.encode_video(video.transpose(0, 1).flatten(0, 1), video_mask.transpose(0, 1).flatten(0, 1),
                              prompts)
    return feats.view(2, c, -1).transpose(0, 1)


def _feature_gradients(core, text: torch.Tensor, vid: torch.Tensor, scale_loss, order_bias=None):
    """Step 2: the loss over the gathered batch and its gradient w.r.t. this process's features.
    With order negatives ``vid`` is (n, 2, D) (each video and its reordered copy) and ``order_bias`` (n,)."""
    rank, world = _rank_and_world()
    all_text = _gather(text).requires_grad_()   # (R*n, D)
    all_video = _gather(vid).requires_grad_()   # (R*n, D) or (R*n, 2, D)
    with torch.enable_grad():
        if order_bias is None:
            loss = contrastive_loss(core.similarity(all_text, all_video))
        else:
            loss = order_contrastive_loss(core.similarity(all_text, all_video[:, 0]),
                                          core.similarity(all_text, all_video[:, 1]), _gather(order_bias))
        (scale_loss(loss) if scale_loss is not None else loss).backward()
    own = slice(rank * text.shape[0], (rank + 1) * text.shape[0])
    return loss.detach().float(), all_text.grad[own], all_video.grad[own]


def _backward_through_encoders(core, ids, video, video_mask, prompts, chunks, rng_states, text_grad, video_grad,
                               autocast):
    """Step 3: re-encode each chunk with its graph and back-propagate its feature gradients."""
    for s, state in zip(chunks, rng_states):
        _set_rng_state(state, video.device)
        with autocast():
            t = core.encode_text(ids[s], prompts)
            v = _encode_videos(core, video[s], video_mask[s], prompts)
        torch.autograd.backward([t, v], [text_grad[s].to(t.dtype), video_grad[s].to(v.dtype)])


def _backward_through_prompts(prompts: Prompts, leaves: Prompts) -> None:
    """Step 4: the prompts' gradient, summed over the chunks, through the prompt generator."""
    pairs = [(p, leaf.grad.to(p.dtype)) for p, leaf in zip(prompts, leaves)
             if p.requires_grad and leaf.grad is not None]
    if pairs:
        torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])


def sum_gradients_over_processes(params: list[torch.Tensor]) -> None:
    """Step 5: every gradient becomes its sum over the processes (one all-reduce per dtype).

    A parameter without a gradient on every process keeps none (as under DDP); one that has a
    gradient somewhere gets the sum, with zeros where it had none.
    """
    _, world = _rank_and_world()
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, group in by_dtype.items():
        has_grad = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=group[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
                         + [has_grad])
        dist.all_reduce(flat)
        pieces = flat[:-len(group)].split([p.numel() for p in group])
        for p, piece, count in zip(group, pieces, flat[-len(group):].tolist()):
            p.grad = piece.view_as(p).clone() if count > 0 else None


# ------------------------------------------------------------------------------------------ helpers
def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of every process, in rank order (no gradient; every process has the same row count)."""
    _, world = _rank_and_world()
    x = x.detach().contiguous()
    if world == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
