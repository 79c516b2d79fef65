"""Memory and time of a training step: plain, with gradient caching (--contrastive_chunk_size) and with
gradient checkpointing (--grad_checkpointing), on random weights in a ViT-B shape.

    python benchmarks/bench_train_memory.py                                 # ViT-B/32, 12 layers, 12 frames, batch 32
    python benchmarks/bench_train_memory.py --layers 4 --frames 4 --batch 16 --chunks 8,4 --repeats 2  # quick, CPU
    python benchmarks/bench_train_memory.py --device cuda --batch 128 --chunks 64,32,16 --precision amp
    python benchmarks/bench_train_memory.py --compile ...    # also torch.compile'd encoders (train and eval)

Every configuration runs in its own process, on the same weights and batch; its prompt gradients are
compared with the plain step's first (max relative difference printed). Memory on CPU is the peak
resident set during the steps above the resident set before them (Linux VmHWM, as in
bench_model.py); on CUDA it is torch's peak allocation during the steps (weights included).
Seconds are medians per optimiser step (forward, backward, AdamW).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_model import build, inputs, peak_rss_mb, reset_peak_rss, time_it  # noqa: E402
from training.step import forward_backward, optimizer_step  # noqa: E402
from training.model_options import compile_encoders, compile_seconds  # noqa: E402


def configurations(args) -> list[tuple[str, int, bool, bool]]:
    """(label, chunk size (0 = plain), checkpointing, compiled encoders)."""
    chunks = [int(c) for c in args.chunks.split(",") if c]
    configs = [("plain", 0, False, False), ("checkpointing", 0, True, False)]
    configs += [(f"chunks of {c}", c, False, False) for c in chunks]
    configs += [(f"chunks of {c} + checkpointing", c, True, False) for c in chunks[-1:]]
    if args.compile:
        configs += [("plain, compiled", 0, False, True)]
    return configs


def precision_context(args):
    device_type = args.device.split(":")[0]
    if args.precision == "bf16":
        return lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if args.precision == "amp":
        return lambda: torch.autocast(device_type=device_type, dtype=torch.float16)
    return contextlib.nullcontext


def run_worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model = build(args).set_grad_checkpointing(args.checkpointing)
    if args.compiled:
        compile_encoders(model)
    ids, video, mask = inputs(args)
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None
    autocast = precision_context(args)

    def scale_loss(loss):
        return scaler.scale(loss) if scaler is not None else loss

    def step_backward():
        forward_backward(model, ids, video, mask, autocast=autocast, scale_loss=scale_loss,
                         contrastive_chunk_size=args.chunk)

    def train_step():
        step_backward()
        optimizer_step(optimizer, scaler)

    # The memory window opens before the first step: memory freed by a step may stay in the process.
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = reset_peak_rss()
    start = time.perf_counter()
    step_backward()  # the gradients of the first step, for the comparison
    first_step = time.perf_counter() - start
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.save(torch.cat([p.grad.flatten().float().cpu() for p in params if p.grad is not None]), args.grads_out)
    optimizer.zero_grad(set_to_none=True)
    seconds = time_it(train_step, args)
    memory = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
              else peak_rss_mb() - before)
    result = {"seconds": seconds, "memory_mb": memory, "first_step_seconds": first_step}
    if args.compiled:  # the evaluation forward too: compiled (its first call compiles) and eager
        eager_encode_video = type(model).encode_video.__get__(model)
        with torch.no_grad(), autocast():
            result["eval_seconds"] = time_it(lambda: model.encode_video(video, mask), args)
            result["eval_eager_seconds"] = time_it(lambda: eager_encode_video(video, mask), args)
        result["compile_seconds"] = compile_seconds(model)  # first calls, compilation included
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunks", default="16,8,4", help="comma-separated chunk sizes to measure")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--latent", choices=["linear", "transformer"], default="linear")
    parser.add_argument("--precision", choices=["fp32", "bf16", "amp"], default="fp32",
                        help="amp: fp16 autocast + GradScaler (CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--compile", action="store_true",
                        help="also the plain step and the evaluation forward with torch.compile'd encoders")
    parser.add_argument("--worker", nargs=4, metavar=("CHUNK", "CHECKPOINTING", "COMPILED", "GRADS_OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision == "amp" and not args.device.startswith("cuda"):
        parser.error("--precision amp needs --device cuda")

    if args.worker:
        args.chunk, args.checkpointing, args.compiled = (int(a) for a in args.worker[:3])
        args.grads_out = args.worker[3]
        print(json.dumps(run_worker(args)))
        return

    print(f"# ViT-B/{args.patch} shape, {args.layers} layers, {args.resolution} px, {args.frames} frames, batch "
          f"{args.batch}, {args.latent} latent space, {args.precision}, {args.device}, {args.threads} threads")
    forwarded = [a for name in ("layers", "frames", "batch", "resolution", "patch", "latent", "precision", "device",
                                "threads", "warmup", "repeats") for a in (f"--{name}", str(getattr(args, name)))]
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, chunk, ckpt, compiled in configurations(args):
            grads_out = os.path.join(tmp, f"{len(results)}.pt")
            cmd = [sys.executable, __file__] + forwarded + ["--worker", str(chunk), str(int(ckpt)), str(int(compiled)), grads_out]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                sys.exit(f"benchmark worker failed ({label}):\n{out.stderr}")
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
            grads[label] = torch.load(grads_out)

    plain = results["plain"]
    header = f"{'step':30} {'seconds':>8} {'x plain':>8} {'peak MB':>8} {'x plain':>8} {'grad diff':>9}"
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        diff = float((grads[label] - grads["plain"]).abs().max() / grads["plain"].abs().max())
        r.update(time_ratio=r["seconds"] / plain["seconds"], memory_ratio=r["memory_mb"] / max(plain["memory_mb"], 1e-9),
                 max_relative_grad_difference=diff)
        print(f"{label:30} {r['seconds']:8.3f} {r['time_ratio']:8.2f} {r['memory_mb']:8.0f} {r['memory_ratio']:8.2f} "
              f"{diff:9.1e}")
    compiled = results.get("plain, compiled")
    if compiled:
        print(f"torch.compile: compilation (first calls) {compiled['compile_seconds']:.1f}s; train step "
              f"{plain['seconds'] / compiled['seconds']:.2f}x, evaluation forward "
              f"{compiled['eval_eager_seconds'] / compiled['eval_seconds']:.2f}x faster than eager "
              f"({compiled['eval_eager_seconds']:.3f}s -> {compiled['eval_seconds']:.3f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
