"""AdamW over the prompt parameters and the published learning-rate schedule.

Parameter groups: weight decay ``wd`` on every trainable parameter whose name does not contain
'bias' (so CLIP-style ``ln_*`` LayerNorm weights are decayed), none on the others.  Groups carry
``lr_mult`` / ``decay_mult`` like the published code; the schedule sets
``lr = schedule(step) * lr_mult`` and ``weight_decay = wd * decay_mult`` before every optimiser step.

Schedule (the published ``lr_scheduler(mode='cos')``), with T = number of optimiser steps done,
W = warmup_proportion * total_steps, lr0 = --lr, floor = 1e-8:
    T <= W (and W > 0):  lr = min(floor + (T / W) * (lr0 - floor), lr0)
    otherwise:           lr = max(0.5 * lr0 * (1 + cos(pi * (T - W) / (total_steps - W))), floor)
total_steps = ceil-divided batches per epoch / accumulation * epochs, as a float (published formula).
"""
from __future__ import annotations

import math

import torch

LR_FLOOR = 1e-8


def build_param_groups(named_params, lr: float, wd: float, coef_lr: float = 1.0, clip_param_names=()):
    """named_params: iterable of (name, parameter) -- the trainable ones (model.trainable_parameters()).

    Parameters listed in ``clip_param_names`` (fine-tuned CLIP weights; none in DGL) get lr * coef_lr.
    """
    clip_param_names = set(clip_param_names)
    buckets = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = "bias" not in name
        is_clip = name in clip_param_names
        buckets.setdefault((is_clip, decay), []).append(p)
    groups = []
    for is_clip in (True, False):
        for decay in (True, False):
            ps = buckets.get((is_clip, decay))
            if not ps:
                continue
            groups.append({"params": ps, "lr": lr, "weight_decay": wd if decay else 0.0,
                           "lr_mult": coef_lr if is_clip else 1.0, "decay_mult": 1.0 if decay else 0.0,
                           "group_name": f"{'clip' if is_clip else 'prompt'}_{'decay' if decay else 'no_decay'}"})
    return groups


def build_optimizer(named_params, lr: float, wd: float, coef_lr: float = 1.0, betas=(0.9, 0.98),
                    eps: float = 1e-6) -> torch.optim.AdamW:
    groups = build_param_groups(named_params, lr, wd, coef_lr)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=wd)


def total_optimization_steps(batches_per_epoch: int, accumulation: int, epochs: int) -> float:
    return (int(batches_per_epoch + accumulation - 1) / accumulation) * epochs


class WarmupCosineSchedule:
    """Stateless: the learning rate is a function of the optimiser step only (resume needs no state)."""

    def __init__(self, base_lr: float, total_steps: float, warmup_proportion: float, weight_decay: float,
                 floor: float = LR_FLOOR):
        self.base_lr = float(base_lr)
        self.total_steps = float(total_steps)
        self.warmup_steps = float(warmup_proportion) * self.total_steps
        self.weight_decay = float(weight_decay)
        self.floor = float(floor)

    def lr_at(self, step: int) -> float:
        # past total_steps (an epoch of --batch_groups can pack into more batches than the first one) the
        # rate stays at the floor instead of climbing the cosine again
        t = float(min(step, self.total_steps))
        w = self.warmup_steps
        if w > 0 and t <= w:
            lr = (t / w) * (self.base_lr - self.floor)
            return min(lr + self.floor, self.base_lr)
        span = self.total_steps - w
        if span <= 0:
            return self.floor
        lr = 0.5 * self.base_lr * (1.0 + math.cos(math.pi * (t - w) / span))
        return max(lr, self.floor)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.weight_decay * g.get("decay_mult", 1.0)
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "weight_decay": self.weight_decay, "floor": self.floor}
