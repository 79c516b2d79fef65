"""Where a training step's and an evaluation forward's CPU time goes, by operator (torch.profiler).

The shape of benchmarks/bench_model.py (ViT-B/32 shape, 224 px, 12 frames, batch 2; ``--layers 4`` by
default), fp32, PyTorch's default kernels. Each operator's self CPU time is printed with its share of
the step, grouped into matrix products, attention, elementwise work, copies and layout changes, and
normalisation / reductions, so that what is left besides the products can be read off.

    python benchmarks/profile_model.py                 # training step and evaluation forward, 4 layers
    python benchmarks/profile_model.py --mode eval --steps 5 --top 30
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_model import build, inputs  # noqa: E402

GROUPS = {
    "products": ("addmm", "mm", "bmm", "matmul", "linear", "convolution", "conv2d", "mkldnn", "baddbmm"),
    "attention": ("scaled_dot_product", "_softmax", "softmax", "flash_attention"),
    "elementwise": ("mul", "add", "sigmoid", "gelu", "div", "sub", "neg", "exp", "fill", "zero", "where",
                    "masked", "threshold", "tanh"),
    "copies / layout": ("copy", "clone", "contiguous", "cat", "stack", "expand", "permute", "transpose",
                        "reshape", "view", "_unsafe", "index", "slice", "select", "split", "chunk", "t",
                        "empty", "as_strided", "unflatten", "flatten"),
    "normalisation / reductions": ("layer_norm", "native_layer_norm", "sum", "mean", "logsumexp", "norm", "max"),
}


def group_of(name: str) -> str:
    op = name.split("::")[-1]
    for group, words in GROUPS.items():
        if any(op == w or op.startswith(w + "_") or op.startswith(w) for w in words):
            return group
    return "other"


def profile(fn, steps: int):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    return [r for r in rows if r[1] > 0]


def report(title: str, rows, top: int) -> None:
    total = sum(t for _, t, _ in rows)
    print(f"\n{title}: self CPU time {total / 1e6:.2f} s in all")
    groups: dict[str, float] = {}
    for name, t, _ in rows:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + t
    for group, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<28} {t / total:6.1%}")
    print(f"  {'operator':<44} {'share':>6} {'calls':>6}  group")
    for name, t, count in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"  {name:<44} {t / total:6.1%} {count:>6}  {group_of(name)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="profiled calls of each (after one warm-up call)")
    p.add_argument("--mode", choices=["train", "eval", "both"], default="both")
    p.add_argument("--top", type=int, default=20, help="operators listed")
    args = p.parse_args()
    args.latent, args.device, args.precision = "linear", "cpu", "fp32"
    torch.set_num_threads(args.threads)
    model = build(args)
    ids, video, mask = inputs(args)
    optimizer = torch.optim.AdamW([q for _, q in model.trainable_parameters()], lr=1e-4)

    def train_step():
        model.train()
        model(ids, video, mask)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_forward():
        model.eval()
        with torch.no_grad():
            model.encode_video(video, mask)

    shape = f"{args.layers} layers, batch {args.batch} x {args.frames} frames x {args.resolution} px, fp32"
    for mode, fn in (("train", train_step), ("eval", eval_forward)):
        if args.mode in (mode, "both"):
            report(f"{'training step' if mode == 'train' else 'evaluation forward'} ({shape}, {args.steps} calls)",
                   profile(fn, args.steps), args.top)


if __name__ == "__main__":
    main()
