"""Step time of the loss with order negatives (--order_negatives reverse) against the plain loss.

    python benchmarks/bench_order_negatives.py                   # the demo's model: 3-layer tiny CLIP, 4 frames, batch 48
    python benchmarks/bench_order_negatives.py --layers 2 --frames 8 --batch 32 --repeats 10

Both steps (forward, backward; no optimiser) run on the same random weights and batch in one process,
alternately, so that a change of machine load hits both alike; prints the median seconds of each and
their ratio. Training also runs the text tower and the data loader, which order negatives leave alone.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from modules.clip import CLIP, tiny_clip_config
    from modules.dgl import DGL, DGLConfig
    from modules.order import frame_orders
    from training.step import forward_backward

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--frame_prompts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = CLIP(tiny_clip_config(vision_layers=args.layers, transformer_layers=args.layers))
    model = DGL(clip, DGLConfig(shared_latent_space="transformer", max_words=16, max_frames=args.frames,
                                text_prompt_length=2 * args.frame_prompts,
                                local_each_frame_prompt_length=args.frame_prompts, global_visual_prompt_length=4,
                                unified_transformer_layers=args.layers)).train()
    ids = torch.randint(1, 1000, (args.batch, 16))
    ids[:, 0], ids[:, -1] = 49406, 49407
    video = torch.randn(args.batch, args.frames, 3, 32, 32)
    mask = torch.ones(args.batch, args.frames, dtype=torch.long)
    order = frame_orders(mask, "reverse")

    def step(with_order: bool) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        forward_backward(model, ids, video, mask, autocast=contextlib.nullcontext, scale_loss=lambda x: x,
                         frame_order=order if with_order else None)
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    plain, ordered = [], []
    for _ in range(args.repeats):
        plain.append(step(False))
        ordered.append(step(True))
    a, b = statistics.median(plain), statistics.median(ordered)
    print(f"batch {args.batch}, {args.frames} frames, {args.layers} layers, {torch.get_num_threads()} threads: "
          f"plain {a:.3f}s, order negatives {b:.3f}s per step (median of {args.repeats}); ratio {b / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
