"""When `search_videos.py index --compile auto` compiles: the video encoder's compile time (from an empty
compile cache and from a warm one) against the time compilation saves per encoded range.

Two processes share one compile cache folder (new and empty unless ``--cache``): the first compiles
from scratch, the second loads what the first stored. Each times the compiled encoder's first call
(compilation included) and then eager and compiled batches in interleaved rounds (medians), and a smaller
batch's first call (padded to the batch size as the index pads it, so no second compilation: its time should
be a compiled batch's). The break-even point is the number of ranges after which the saving covers the first
call's extra time and, at worst, the padded rows of a run's last batch (batch - 1 rows of a compiled batch):

    (first call - compiled batch / batch) / ((eager batch - compiled batch) / batch)

    python benchmarks/bench_index_compile.py                      # ViT-B/32 shape, 12 layers, batch 8, fp32
    python benchmarks/bench_index_compile.py --layers 4 --batch 2 --rounds 5

The model has random weights at the given shape (compile and compute time do not depend on the values).
Decoding is not timed: the index decodes in worker processes next to the model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_model(args):
    import torch

    from modules.clip import CLIP, CLIPConfig
    from modules.dgl import DGL, DGLConfig

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision_layers=args.layers, transformer_layers=args.layers,
                           vision_patch_size=args.patch, image_resolution=args.resolution))
    config = DGLConfig(max_frames=args.frames, unified_transformer_layers=args.layers)
    return DGL(clip, config).eval()


def worker(args) -> dict:
    import torch

    from retrieval.encode import compile_video_encoder
    from runtime.compilation import use_compile_cache

    torch.set_num_threads(args.threads)
    use_compile_cache(args.cache)
    model = build_model(args)
    g = torch.Generator().manual_seed(1)
    video = torch.randn(args.batch, args.frames, 3, args.resolution, args.resolution, generator=g)
    mask = torch.ones(args.batch, args.frames, dtype=torch.long)
    eager = model.encode_video
    compile_video_encoder(model, batch_size=args.batch)
    compiled = model.encode_video
    with torch.no_grad():
        start = time.perf_counter()
        compiled(video, mask)
        first = time.perf_counter() - start
        eager(video, mask)  # warm-up
        times = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for name, fn in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                fn(video, mask)
                times[name].append(time.perf_counter() - start)
        difference = (compiled(video, mask) - eager(video, mask)).abs().max().item()
        second = None
        if args.batch > 1:  # a last, smaller batch: padded to the batch size, so the graph is the one compiled
            start = time.perf_counter()
            compiled(video[:-1], mask[:-1])
            second = time.perf_counter() - start
    return {"first_call_s": first, "smaller_batch_first_call_s": second, "eager_s": statistics.median(times["eager"]),
            "compiled_s": statistics.median(times["compiled"]), "rounds": times, "max_difference": difference}


def break_even(run: dict, batch: int) -> float:
    saved = (run["eager_s"] - run["compiled_s"]) / batch
    extra = run["first_call_s"] - run["compiled_s"] / batch
    return float("inf") if saved <= 0 else extra / saved


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="ranges per batch (search_videos.py index --batch_size)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved eager / compiled batches per process")
    p.add_argument("--cache", default=None, help="compile cache folder (default: a new empty one, removed after)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory(prefix="dgl-compile-") as empty:
        cache = args.cache or empty
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "--cache", cache]
        for flag in ("layers", "batch", "frames", "resolution", "patch", "threads", "rounds"):
            argv += [f"--{flag}", str(getattr(args, flag))]
        runs = {}
        for name in ("cold", "warm"):
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} run failed:\n{done.stderr[-3000:]}")
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    shape = f"{args.layers} layers, batch {args.batch} x {args.frames} frames x {args.resolution} px, fp32"
    print(f"video encoder, {shape}, {args.threads} threads")
    for name, run in runs.items():
        print(f"{name:>5} cache: first call {run['first_call_s']:.1f} s (a smaller batch, padded: "
              f"{run['smaller_batch_first_call_s'] or 0:.1f} s); batch eager {run['eager_s']:.3f} s, "
              f"compiled {run['compiled_s']:.3f} s (eager / compiled {run['eager_s'] / run['compiled_s']:.3f}, "
              f"medians of {args.rounds} interleaved rounds); break-even after "
              f"{break_even(run, args.batch):.0f} ranges; largest difference {run['max_difference']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "threads": args.threads, **runs}, f, indent=1)


if __name__ == "__main__":
    main()
