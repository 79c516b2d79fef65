"""The order of events: frame-reordered copies of videos, the contrastive loss with those copies as
extra negatives, and the order metrics.

Order negatives (TACT, Bagad et al., CVPR 2023, "Test of Time"): for every training video a copy with
its frames reversed (or shuffled) is encoded too, and every caption of the global batch scores every
such copy as one more negative in the text-to-video direction of the symmetric InfoNCE loss, with
``log(weight)`` added to those logits (the weight multiplies their share of the softmax denominator).
A caption that fits its reversed video as well ("a man stands") makes that copy a false negative: a
weight below 1 softens it.

Frame orders are index tensors ``(n, T)`` over the frame axis: only the valid frames (``video_mask``
non-zero) are reordered, padding frames stay where they are. A video with fewer than two valid frames
has no other order: its copy would be the video itself, so its column is left out of the loss (logit
-inf) instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ORDER_NEGATIVES = ("none", "reverse", "shuffle")
# Two similarities closer than this (relative to their size) are a tie in the order metrics: the features
# of a model blind to order (mean-pooled frames, DGL-Linear) differ under reversal only by the rounding of
# sums taken in another order (about 1e-7 relative in fp32; bf16 autocast rounds to about 4e-3).
TIE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _seed_of(seed: int, epoch: int, index: int) -> int:
    """A generator seed for one sample of one epoch: the same whatever the processes and batches."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2 ** 63 - 1)


def frame_orders(video_mask: torch.Tensor, kind: str, seeds=None) -> torch.Tensor:
    """(n, T) long: for each video, the frame positions in their new order.

    kind "reverse": the valid frames backwards; "shuffle": a permutation of the valid frames drawn with
    ``torch.Generator().manual_seed(seeds[i])``, drawn again until it is not the identity (needs ``seeds``,
    one int per video); "none": the identity. Padding positions (mask 0) map to themselves.
    """
    if kind not in ORDER_NEGATIVES:
        raise ValueError(f"frame order must be one of {ORDER_NEGATIVES}, got {kind!r}")
    n, T = video_mask.shape
    order = torch.arange(T).repeat(n, 1)
    if kind == "none":
        return order
    if kind == "shuffle" and (seeds is None or len(seeds) != n):
        raise ValueError(f"shuffled frame orders need one seed per video ({n}), got "
                         f"{None if seeds is None else len(seeds)}")
    valid = video_mask.detach().cpu() > 0
    for i in range(n):
        slots = valid[i].nonzero().flatten()
        k = int(slots.numel())
        if k < 2:
            continue
        if kind == "reverse":
            new = slots.flip(0)
        else:
            g = torch.Generator().manual_seed(int(seeds[i]))
            while True:
                p = torch.randperm(k, generator=g)
                if not torch.equal(p, torch.arange(k)):
                    break
            new = slots[p]
        order[i, slots] = new
    return order.to(video_mask.device)


def sample_seeds(seed: int, epoch: int, indices) -> list[int]:
    """The shuffle seeds of the samples ``indices`` (dataset indices) in ``epoch``."""
    return [_seed_of(int(seed), int(epoch), int(i)) for i in torch.as_tensor(indices).flatten().tolist()]


def reorder_frames(video: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """video (n, T, ...) with each row's frames taken in ``order`` (n, T)."""
    rows = torch.arange(video.shape[0], device=video.device)[:, None]
    return video[rows, order.to(video.device)]


def order_column_bias(order: torch.Tensor, weight: float) -> torch.Tensor:
    """(n,) float32: log(weight) for each reordered copy, -inf where the order is the identity (a video
    with fewer than two valid frames), which leaves that copy out of the loss."""
    if not weight > 0:
        raise ValueError(f"the order negative weight must be > 0, got {weight}")
    identity = (order == torch.arange(order.shape[1], device=order.device)).all(dim=1)
    bias = torch.full((order.shape[0],), math.log(weight), dtype=torch.float32, device=order.device)
    return bias.masked_fill(identity, float("-inf"))


def order_contrastive_loss(sim: torch.Tensor, order_sim: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of ``sim`` (N, N; positives on the diagonal) with the columns ``order_sim + bias``
    (N, N: every caption against every reordered copy, plus each copy's log weight) as extra negatives of
    the text-to-video direction. The video-to-text direction is the plain one."""
    target = torch.arange(sim.shape[0], device=sim.device)
    t2v = torch.cat([sim, order_sim + bias.to(order_sim.dtype)[None, :]], dim=1)
    return (F.cross_entropy(t2v, target) + F.cross_entropy(sim.t(), target)) / 2


# ------------------------------------------------------------------------------------------ metrics
def order_win_rate(scores: torch.Tensor, other: torch.Tensor, tolerance: float = 1e-5) -> dict:
    """How often ``scores`` beat ``other`` (pairwise): {"percent", "ties", "count"}. A pair closer than
    ``tolerance`` x the larger magnitude (at least ``tolerance`` in absolute terms) is a tie and counts
    one half, so a model blind to the difference scores exactly 50 %."""
    a, b = torch.as_tensor(scores).double().flatten(), torch.as_tensor(other).double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"need as many scores as other scores, got {a.numel()} and {b.numel()}")
    if a.numel() == 0:
        return {"percent": None, "ties": 0, "count": 0}
    tie = (a - b).abs() <= tolerance * torch.maximum(torch.maximum(a.abs(), b.abs()), torch.ones_like(a))
    wins = torch.where(tie, torch.full_like(a, 0.5), (a > b).double())
    return {"percent": 100.0 * float(wins.mean()), "ties": int(tie.sum()), "count": int(a.numel())}


def pair_scores(core, text_feats: torch.Tensor, video_feats: torch.Tensor) -> torch.Tensor:
    """(N,) similarity of caption i with video i (row-wise, fp32, the same scale as ``core.similarity``)."""
    t = F.normalize(text_feats.float(), dim=-1)
    v = F.normalize(video_feats.float(), dim=-1)
    scale = float(core.clip.logit_scale.detach().float().exp()) if hasattr(core, "clip") else 1.0
    return scale * (t * v).sum(-1)


def order_metrics(core, text_feats, video_feats, reversed_feats, cap_idx, twin_feats=None,
                  tolerance: float = 1e-5) -> dict:
    """The order metrics of one evaluation, as {"reversed_video": {...}, "swapped_caption": {...}}:

    * reversed_video: the share of captions whose video scores above the same video with its valid frames
      reversed (no labels needed beyond the test pairs; TACT's consistency measure);
    * swapped_caption (where ``twin_feats`` (N, D) has a row for a caption: NaN rows have none): the share of
      captions that score above their order-swapped twin caption against their own video.

    Each is {"percent", "ties", "count"}; scores within ``tolerance`` (relative) are ties and count one half,
    so a model whose features do not change under reversal is at exactly 50 %.
    """
    own = video_feats[cap_idx]
    out = {"reversed_video": order_win_rate(pair_scores(core, text_feats, own),
                                            pair_scores(core, text_feats, reversed_feats[cap_idx]), tolerance)}
    if twin_feats is not None:
        has = ~torch.isnan(twin_feats).any(dim=1)
        if bool(has.any()):
            out["swapped_caption"] = order_win_rate(pair_scores(core, text_feats[has], own[has]),
                                                    pair_scores(core, twin_feats[has], own[has]), tolerance)
    return out


def format_order(order: dict) -> str:
    """'reversed video 87.5% (2 ties of 60 captions); swapped caption 91.7% (0 ties of 60)'."""
    parts = []
    for key, label in (("reversed_video", "reversed video"), ("swapped_caption", "swapped caption")):
        r = order.get(key)
        if r and r.get("percent") is not None:
            parts.append(f"{label} {r['percent']:.1f}% ({r['ties']} ties of {r['count']} captions)")
    return "; ".join(parts) or "n/a"


def tie_tolerance(dtype: torch.dtype | None) -> float:
    return TIE_TOLERANCE.get(dtype or torch.float32, TIE_TOLERANCE[torch.float32])


class OrderNegatives:
    """What the training loop needs: ``kind`` ("reverse" / "shuffle"), ``weight`` and the run's ``seed``.
    ``frame_order(batch, epoch)`` is a micro-batch's (n, T) orders; a shuffle depends on the seed, the epoch
    and each sample's dataset index only (the same under any number of processes, micro-batches or chunks,
    and on a resumed run)."""

    def __init__(self, kind: str, weight: float = 1.0, seed: int = 0):
        if kind not in ORDER_NEGATIVES or kind == "none":
            raise ValueError(f"order negatives must be 'reverse' or 'shuffle', got {kind!r}")
        if not weight > 0:
            raise ValueError(f"the order negative weight must be > 0, got {weight}")
        self.kind, self.weight, self.seed = kind, float(weight), int(seed)

    def frame_order(self, batch: dict, epoch: int) -> torch.Tensor:
        mask = batch["video_mask"]
        seeds = sample_seeds(self.seed, epoch, batch["index"]) if self.kind == "shuffle" else None
        return frame_orders(mask, self.kind, seeds)
