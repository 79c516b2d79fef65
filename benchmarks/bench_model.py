"""Speed of DGL's training step and evaluation forward, against two baselines on the same weights.

* published: the computation as the published code writes it (benchmarks/published_reference.py:
  sequence-first tensors, a loop over frames filling zeroed key buffers, separate query and key/value
  projections);
* loop: our model with only the global-local attention replaced by a Python loop over frames, each
  frame attending to [global tokens, its own tokens], then the global tokens over the whole sequence.

All three are checked to give the same features and prompt gradients before timing. A plain CLIP
image forward over the same frames gives the cost of the prompt tokens themselves.

    python benchmarks/bench_model.py                    # ViT-B/32 shape: 12 layers, 224 px, 12 frames
    python benchmarks/bench_model.py --layers 4         # the shape of the published-code reference timing
    python benchmarks/bench_model.py --precision fp32   # fp32 only (default: fp32 and bf16)
    python benchmarks/bench_model.py --rounds 3         # medians over 3 interleaved sweeps

Each configuration runs in its own process. Memory on CPU is the peak resident set during the timed
loop above the resident set before it (activations and temporaries, not weights; Linux's VmHWM,
reset before the loop); on CUDA it is torch's peak allocation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modules.dgl as dgl_module  # noqa: E402
from benchmarks import published_reference as published  # noqa: E402
from modules.clip import CLIP, CLIPConfig  # noqa: E402
from modules.dgl import DGL, DGLConfig, contrastive_loss  # noqa: E402

IMPLS = ("ours", "published", "loop")


def per_frame_loop_block(block, x, num_global, num_frames, key_padding_mask=None):
    """The global-local block written directly: one attention call per frame."""
    B, length, W = x.shape
    G, T = num_global, num_frames
    L = (length - G) // T

    def mha(query, keys):  # batch-first use of the reference's sequence-first attention
        keys = keys.transpose(0, 1)
        return published.mha(block, query.transpose(0, 1), keys, keys).transpose(0, 1)

    h = block.ln_1(x)
    glob, frames = h[:, :G], h[:, G:].reshape(B, T, L, W)
    outputs = [mha(glob, h)]
    for t in range(T):
        outputs.append(mha(frames[:, t], torch.cat([glob, frames[:, t]], dim=1)))
    x = x + torch.cat(outputs, dim=1)
    return x + block.mlp(block.ln_2(x))


@contextlib.contextmanager
def attention_impl(name: str):
    original = dgl_module.global_local_block
    if name == "loop":
        dgl_module.global_local_block = per_frame_loop_block
    try:
        yield
    finally:
        dgl_module.global_local_block = original


def build(args) -> DGL:
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(vision_layers=args.layers, transformer_layers=args.layers,
                           vision_patch_size=args.patch, image_resolution=args.resolution))
    config = DGLConfig(shared_latent_space=args.latent, max_frames=args.frames, max_words=32,
                       unified_transformer_layers=args.layers)
    return DGL(clip, config).to(args.device)


def inputs(args):
    g = torch.Generator().manual_seed(1)
    video = torch.randn(args.batch, args.frames, 3, args.resolution, args.resolution, generator=g)
    mask = torch.ones(args.batch, args.frames, dtype=torch.long)
    ids = torch.randint(1, 40000, (args.batch, 32), generator=g)
    ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0
    return ids.to(args.device), video.to(args.device), mask.to(args.device)


def autocast(args):
    if args.precision == "bf16":
        return torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn, args) -> float:
    for _ in range(args.warmup):
        fn()
    sync(args)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        sync(args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Start a new peak-memory window (Linux: clear VmHWM); returns the resident size now, in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    now = _status_mb("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encoders(model: DGL, impl: str):
    """(encode_text, encode_video) of one implementation."""
    if impl == "published":
        return (lambda ids: published.encode_text(model, ids),
                lambda video, mask: published.encode_video(model, video))
    return model.encode_text, model.encode_video


def training_loss(model: DGL, impl: str, ids, video, mask) -> torch.Tensor:
    if impl != "published":
        return model(ids, video, mask)["loss"]
    encode_text, encode_video = encoders(model, impl)
    return contrastive_loss(model.similarity(encode_text(ids), encode_video(video, mask)))


def run_worker(args) -> dict:
    """One measurement (impl x mode x precision) in this process."""
    torch.set_num_threads(args.threads)
    model = build(args)
    ids, video, mask = inputs(args)
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-4)
    _, encode_video = encoders(model, args.impl)

    def train_step():
        with autocast(args):
            loss = training_loss(model, args.impl, ids, video, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_forward():
        with torch.no_grad(), autocast(args):
            encode_video(video, mask)

    def clip_forward():
        with torch.no_grad(), autocast(args):
            model.clip.encode_image(video.flatten(0, 1))

    fn = {"train": train_step, "eval": eval_forward, "clip": clip_forward}[args.mode]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = reset_peak_rss()
    with attention_impl(args.impl):
        seconds = time_it(fn, args)
    memory = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
              else peak_rss_mb() - before)
    return {"seconds": seconds, "memory_mb": memory}


def check_same_results(args) -> dict:
    """Max abs difference to ours of each baseline (video features and prompt gradients, fp32)."""
    model = build(args)
    ids, video, mask = inputs(args)
    results = {}
    for impl in IMPLS:
        model.zero_grad(set_to_none=True)
        with attention_impl(impl):
            features = encoders(model, impl)[1](video, mask)
            training_loss(model, impl, ids, video, mask).backward()
        grads = torch.cat([p.grad.flatten() for _, p in model.trainable_parameters() if p.grad is not None])
        results[impl] = (features.detach(), grads)
    ours = results["ours"]
    return {impl: max(float((f - ours[0]).abs().max()), float((g - ours[1]).abs().max()))
            for impl, (f, g) in results.items() if impl != "ours"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--latent", choices=["linear", "transformer"], default="linear")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep; report medians")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.impl, args.mode, args.precision = args.worker
        print(json.dumps(run_worker(args)))
        return

    shape = (f"ViT-B/{args.patch} shape, {args.layers} layers, {args.resolution} px, {args.frames} frames, "
             f"batch {args.batch}, {args.latent} latent space, {args.device}, {args.threads} threads")
    print(f"# {shape}")
    if args.device == "cpu":
        from training.engine import cpu_has_native_bf16

        native = cpu_has_native_bf16()
        print(f"# CPU native bf16 (AMX / AVX512-BF16): {'unknown' if native is None else 'yes' if native else 'no: bf16 is emulated'}")
    for impl, diff in check_same_results(args).items():
        print(f"max |ours - {impl}| over video features and prompt gradients (fp32): {diff:.2e}")

    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    impls = [i for i in IMPLS if i in args.impls.split(",")]
    forwarded = ["--layers", args.layers, "--frames", args.frames, "--batch", args.batch, "--resolution",
                 args.resolution, "--patch", args.patch, "--latent", args.latent, "--device", args.device,
                 "--threads", args.threads, "--warmup", args.warmup, "--repeats", args.repeats]
    base_cmd = [sys.executable, __file__] + [str(a) for a in forwarded]
    frames = args.batch * args.frames
    configs = [(precision, mode, impl) for precision in precisions for mode in ("train", "eval", "clip")
               for impl in (impls if mode != "clip" else ("ours",))]
    # Rounds go over every configuration in turn, so that drifts in machine load hit all of them alike.
    runs: dict = {config: [] for config in configs}
    for _ in range(args.rounds):
        for precision, mode, impl in configs:
            cmd = base_cmd + ["--precision", precision, "--worker", impl, mode, precision]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode != 0:
                sys.exit(f"benchmark worker failed ({impl} {mode} {precision}):\n{out.stderr}")
            runs[(precision, mode, impl)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {config: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for config, rs in runs.items()}
    print(f"(medians over {args.rounds} round(s) of {args.repeats} timed repeats each)")

    header = f"{'precision':9} {'measure':28} {'seconds':>8} {'frames/s':>9} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    for (precision, mode, impl), r in results.items():
        label = {"train": "train step", "eval": "eval forward", "clip": "plain CLIP forward"}[mode]
        label += "" if mode == "clip" else f" ({impl})"
        print(f"{precision:9} {label:28} {r['seconds']:8.3f} {frames / r['seconds']:9.1f} {r['memory_mb']:8.0f}")
    print()

    def ratio(slow, fast):
        return results[slow]["seconds"] / results[fast]["seconds"]

    for precision in precisions:
        for impl in impls[1:]:
            print(f"{precision}: ours vs {impl}: train step {ratio((precision, 'train', impl), (precision, 'train', 'ours')):.2f}x "
                  f"faster, eval forward {ratio((precision, 'eval', impl), (precision, 'eval', 'ours')):.2f}x faster")
        print(f"{precision}: eval forward / plain CLIP forward over the same frames = "
              f"{ratio((precision, 'eval', 'ours'), (precision, 'clip', 'ours')):.2f}")
    if len(precisions) == 2 and "published" in impls:
        print(f"bf16 train step (ours) vs fp32 train step (published): "
              f"{ratio(('fp32', 'train', 'published'), ('bf16', 'train', 'ours')):.2f}x faster")
    tokens = 1 + (args.resolution // args.patch) ** 2
    print(f"(prompt tokens alone cost about (1+P+S)/(1+S) = {(tokens + 4) / tokens:.2f} of plain CLIP)")
    if args.json:
        Path(args.json).write_text(json.dumps({"/".join(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
