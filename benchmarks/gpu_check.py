"""One-command check of DGL on a GPU: speed, memory and numerical health against the published computation.

    python benchmarks/gpu_check.py --out gpu_check.json                  # CUDA: the full check, ~7 min on an H100
    python benchmarks/gpu_check.py --device cpu --tiny --out smoke.json  # seconds: tiny shapes (CI)

Random-weight CLIPs in the ViT-B/32 and ViT-B/16 shapes (224 px) wrapped in DGL (the published MSR-VTT
recipe by default: transformer latent space, 12 frames, 32 words) are measured in one process:

* train: the training step (forward, backward, AdamW on the prompts) at the published per-GPU batch
  (MSR-VTT: 128) in fp32, AMP (fp16 autocast + GradScaler) and bf16, for this implementation and the
  published-style computation (reference/published.py) on the same weights: median step
  time after warm-up, videos/s, peak memory. Where a batch does not fit, it is halved until both
  implementations fit, so the ratios are always at equal batch. Targets: at least 1.3x faster and at
  most 0.7x the peak memory of the published computation.
* eval: video and text encoding throughput (no gradient).
* stability: a few hundred AMP steps with the GradScaler on fresh random batches: no NaN/inf in the
  losses the scaler keeps or in the prompts.
* max_batch: the largest batch that fits (doubling until out of memory, time-boxed).
* distributed: a 1-process torchrun with NCCL (gloo on CPU): process group, all_gather, all_reduce,
  the DDP-wrapped training step and the gather-with-gradient loss equal to the local loss.

The loss printed with each measurement only shows it is finite: the implementations share one model whose
prompts every measurement trains further (their equality is tested in tests/ and checked by bench_model.py).
Every section is guarded (an out-of-memory or a failure is recorded and the rest still runs), the JSON
is rewritten atomically after every measurement, and sections are skipped once --time_budget_s is spent.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_model  # noqa: E402
from modules.clip import CLIP, CLIPConfig, tiny_clip_config  # noqa: E402
from modules.dgl import DGL, DGLConfig, contrastive_loss  # noqa: E402
from runtime.errors import first_line  # noqa: E402
from runtime.precision import Precision  # noqa: E402
from training.step import optimizer_step  # noqa: E402

SHAPES = {  # CLIP shapes (text tower: CLIP's 12 layers x 512)
    "B/32": lambda: CLIPConfig(vision_patch_size=32),
    "B/16": lambda: CLIPConfig(vision_patch_size=16),
    "tiny": tiny_clip_config,
}
PRECISIONS = ("fp32", "amp", "bf16")
IMPLS = ("ours", "published")
SECTIONS = ("distributed", "train", "eval", "stability", "max_batch")
SPEED_TARGET, MEMORY_TARGET = 1.3, 0.7
MB = 2 ** 20
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda only


# ------------------------------------------------------------------------------------------ report
class Report:
    """The results so far: printed as progress lines, rewritten atomically to --out after every step."""

    def __init__(self, path: str, budget_s: float):
        self.path = Path(path)
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.data = {"environment": {}, "train": [], "comparisons": [], "eval": [], "stability": None,
                     "max_batch": [], "distributed": None, "skipped": [], "elapsed_s": 0.0, "finished": False}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def skip(self, what: str) -> None:
        self.data["skipped"].append(what)
        self.log(f"skipped (time budget of {self.budget_s:.0f}s spent): {what}")

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(_json_safe(self.data), f, indent=1)
        os.replace(tmp, self.path)


def _json_safe(value):
    """NaN and inf as strings (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _error_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error, empty='')}"[:300]


def guarded(fn, *fn_args, **fn_kwargs) -> dict:
    """fn's result dict with status 'ok', or status 'oom' / 'error' and the error's first line."""
    try:
        result = {"status": "ok", **fn(*fn_args, **fn_kwargs)}
    except OutOfMemoryError as error:
        result = {"status": "oom", "error": _error_line(error)}
    except Exception as error:  # a failure of one measurement must not end the check
        result = {"status": "error", "error": _error_line(error)}
    free_memory()  # after the except clause, so the traceback's tensors are gone
    return result


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> float:
    """Start a new peak-memory window; returns the memory allocated now (MB; 0 on CPU)."""
    if device.type != "cuda":
        return 0.0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / MB


def peak_mb(device: torch.device) -> float | None:
    """torch's peak allocation since reset_peak (None on CPU, where torch does not track it)."""
    return torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None


def timed_median(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median wall time of fn over ``iters`` calls after ``warmup`` calls, synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ model and data
def build_model(arch: str, args) -> DGL:
    """DGL on a random-weight CLIP, initialised on the device (a CPU init of ViT-B/16 takes seconds)."""
    torch.manual_seed(0)
    config = SHAPES[arch]()
    with torch.device(args.device):
        return DGL(CLIP(config), DGLConfig(shared_latent_space=args.latent, max_frames=args.frames,
                                           max_words=args.words, unified_transformer_layers=config.vision_layers))


def random_batch(arch: str, batch: int, args, seed: int = 1):
    """(ids, video, mask) drawn on the device (a B/16 batch of 128 x 12 frames is ~1 GB of pixels)."""
    resolution = SHAPES[arch]().image_resolution
    g = torch.Generator(device=args.device).manual_seed(seed)
    video = torch.randn(batch, args.frames, 3, resolution, resolution, generator=g, device=args.device)
    ids = torch.randint(1, 40000, (batch, args.words), generator=g, device=args.device)
    eot = max(2, args.words * 2 // 3)  # a caption of eot - 1 tokens, then padding
    ids[:, 0], ids[:, eot], ids[:, eot + 1:] = 49406, 49407, 0
    mask = torch.ones(batch, args.frames, dtype=torch.long, device=args.device)
    return ids, video, mask


def train_step(model, impl: str, precision: str, optimizer, scaler, ids, video, mask) -> torch.Tensor:
    """One training step as training/step.py takes it; returns the loss (not synchronised)."""
    with Precision(precision, ids.device).autocast():  # main.py's autocast for --precision
        loss = bench_model.training_loss(model, impl, ids, video, mask)
    (loss if scaler is None else scaler.scale(loss)).backward()
    optimizer_step(optimizer, scaler)
    return loss.detach()


def make_optimizer(model, args):
    return torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=args.lr, weight_decay=0.2)


# ------------------------------------------------------------------------------------------ measurements
def measure_training(model, arch: str, impl: str, precision: str, batch: int, args, warmup: int, iters: int) -> dict:
    model.train()
    model.zero_grad(set_to_none=True)  # an out-of-memory in a backward pass can leave gradients behind
    ids, video, mask = random_batch(arch, batch, args)
    optimizer, scaler = make_optimizer(model, args), Precision(precision, args.device).make_scaler()
    before = reset_peak(args.device)
    losses = []

    def step():
        losses.append(train_step(model, impl, precision, optimizer, scaler, ids, video, mask))

    seconds = timed_median(step, warmup, iters, args.device)
    peak = peak_mb(args.device)
    return {"step_s": seconds, "videos_per_s": batch / seconds, "peak_mb": peak,
            "activation_mb": None if peak is None else peak - before, "loss": float(losses[-1].float())}


def measure_eval(model, arch: str, impl: str, precision: str, batch: int, args) -> dict:
    ids, video, mask = random_batch(arch, batch, args)
    encode_text, encode_video = bench_model.encoders(model, impl)
    model.eval()
    with torch.no_grad(), Precision(precision, args.device).autocast():
        before = reset_peak(args.device)
        video_s = timed_median(lambda: encode_video(video, mask), args.warmup, args.iters, args.device)
        video_peak = peak_mb(args.device)
        text_s = timed_median(lambda: encode_text(ids), args.warmup, args.iters, args.device)
    return {"video_batch_s": video_s, "videos_per_s": batch / video_s, "texts_per_s": batch / text_s,
            "video_peak_mb": video_peak, "video_activation_mb": None if video_peak is None else video_peak - before}


def train_section(model, arch: str, args, report: Report) -> None:
    """Each precision: both implementations at --batch, halved until both fit; then their ratios."""
    for precision in args.precision_list:
        batch = args.batch
        while True:
            if report.over_budget():
                report.skip(f"train {arch} {precision} batch {batch}")
                break
            results = {}
            for impl in args.impl_list:
                r = guarded(measure_training, model, arch, impl, precision, batch, args, args.warmup, args.iters)
                results[impl] = r
                report.data["train"].append({"arch": arch, "precision": precision, "impl": impl, "batch": batch, **r})
                report.log(f"train {arch} {precision:4} {impl:9} batch {batch:4}: {describe_train(r)}")
                report.save()
            statuses = {r["status"] for r in results.values()}
            if statuses == {"ok"}:
                record_comparison(arch, precision, batch, results, report)
                break
            if "oom" not in statuses or batch // 2 < args.min_batch:
                break
            batch //= 2


def describe_train(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status'].upper()} ({r['error']})"
    memory = "" if r["peak_mb"] is None else f", peak {r['peak_mb'] / 1024:.2f} GiB"
    return f"{r['step_s']:.3f} s/step, {r['videos_per_s']:.1f} videos/s{memory}, loss {r['loss']:.3f}"


def record_comparison(arch: str, precision: str, batch: int, results: dict, report: Report) -> None:
    if set(results) != set(IMPLS):
        return
    ours, published = results["ours"], results["published"]
    row = {"arch": arch, "precision": precision, "batch": batch,
           "speedup": published["step_s"] / ours["step_s"], "memory_ratio": None, "activation_memory_ratio": None}
    if ours["peak_mb"] is not None:
        row["memory_ratio"] = ours["peak_mb"] / published["peak_mb"]
        row["activation_memory_ratio"] = ours["activation_mb"] / max(published["activation_mb"], 1e-9)
    row["speed_target_met"] = row["speedup"] >= SPEED_TARGET
    row["memory_target_met"] = None if row["memory_ratio"] is None else row["memory_ratio"] <= MEMORY_TARGET
    report.data["comparisons"].append(row)
    report.log(f"  ours vs published, {arch} {precision} batch {batch}: {describe_comparison(row)}")
    report.save()


def describe_comparison(row: dict) -> str:
    text = f"{row['speedup']:.2f}x faster (target >= {SPEED_TARGET}x: {'met' if row['speed_target_met'] else 'NOT met'})"
    if row["memory_ratio"] is not None:
        text += (f", peak memory {row['memory_ratio']:.2f}x (target <= {MEMORY_TARGET}x: "
                 f"{'met' if row['memory_target_met'] else 'NOT met'}; above weights and inputs "
                 f"{row['activation_memory_ratio']:.2f}x)")
    return text


def eval_section(model, arch: str, args, report: Report) -> None:
    for precision in args.eval_precision_list:
        for impl in args.impl_list:
            if report.over_budget():
                report.skip(f"eval {arch} {precision} {impl}")
                continue
            r = guarded(measure_eval, model, arch, impl, precision, args.eval_batch, args)
            report.data["eval"].append({"arch": arch, "precision": precision, "impl": impl,
                                        "batch": args.eval_batch, **r})
            text = (f"{r['videos_per_s']:.1f} videos/s, {r['texts_per_s']:.0f} texts/s" if r["status"] == "ok"
                    else f"{r['status'].upper()} ({r['error']})")
            report.log(f"eval  {arch} {precision:4} {impl:9} batch {args.eval_batch:4}: {text}")
            report.save()


def run_stability(model, arch: str, args, report: Report, deadline: float) -> dict:
    """AMP steps as main.py takes them (fp16 autocast with the GradScaler on CUDA; bf16 autocast, no scaler, on
    CPU) on fresh batches: count non-finite losses and skipped updates."""
    model.train()
    model.zero_grad(set_to_none=True)
    optimizer, scaler = make_optimizer(model, args), Precision("amp", args.device).make_scaler()
    losses, skipped = [], 0

    def scale() -> float | None:
        return None if scaler is None else scaler.get_scale()

    for step in range(args.stability_steps):
        if report.elapsed() > deadline:
            break
        ids, video, mask = random_batch(arch, args.stability_batch, args, seed=100 + step)
        before = scale()
        losses.append(float(train_step(model, "ours", "amp", optimizer, scaler, ids, video, mask).float()))
        skipped += scaler is not None and scale() < before  # the scaler lowers its scale when it skips an update
        if (step + 1) % 50 == 0:
            report.log(f"  stability step {step + 1}: loss {losses[-1]:.4f}, scale {scale()}")
    params_finite = all(bool(torch.isfinite(p).all()) for _, p in model.trainable_parameters())
    nonfinite = sum(not math.isfinite(v) for v in losses)
    return {"steps": len(losses), "requested_steps": args.stability_steps, "batch": args.stability_batch,
            "nonfinite_losses": nonfinite, "skipped_updates": int(skipped), "final_scale": scale(),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "params_finite": params_finite,
            "passed": bool(losses) and params_finite and math.isfinite(losses[-1]) and nonfinite <= skipped}


def stability_section(model, arch: str, args, report: Report) -> None:
    if report.over_budget():
        report.skip("stability")
        return
    deadline = min(report.budget_s, report.elapsed() + args.stability_time_s)
    r = guarded(run_stability, model, arch, args, report, deadline)
    report.data["stability"] = {"arch": arch, "precision": "amp", **r}
    report.log(f"stability {arch} amp: {describe_stability(r)}")
    report.save()


def describe_stability(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status'].upper()} ({r['error']})"
    return (f"{'PASS' if r['passed'] else 'FAIL'}: {r['steps']}/{r['requested_steps']} steps at batch {r['batch']}, "
            f"{r['nonfinite_losses']} non-finite losses, {r['skipped_updates']} updates skipped by the scaler, "
            f"prompts finite: {r['params_finite']}, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")


def max_batch_section(model, arch: str, args, report: Report) -> None:
    """Per implementation: double the batch from the largest that fitted until out of memory (time-boxed)."""
    deadline = min(report.budget_s, report.elapsed() + args.max_batch_time_s)
    for impl in args.impl_list:
        fitted = [r["batch"] for r in report.data["train"] if r["arch"] == arch and r["impl"] == impl
                  and r["precision"] == args.max_batch_precision and r["status"] == "ok"]
        best = max(fitted, default=None)
        batch = 2 * best if best else args.min_batch
        tries = []
        while batch <= args.max_batch_limit:
            if report.elapsed() > deadline:
                report.skip(f"max_batch {arch} {impl} batch {batch}")
                break
            r = guarded(measure_training, model, arch, impl, args.max_batch_precision, batch, args, 1, 1)
            tries.append({"batch": batch, **r})
            report.log(f"max batch {arch} {args.max_batch_precision} {impl:9} batch {batch:5}: {describe_train(r)}")
            if r["status"] != "ok":
                break
            best, batch = batch, 2 * batch
        report.data["max_batch"].append({"arch": arch, "precision": args.max_batch_precision, "impl": impl,
                                         "largest_fitting_batch": best, "tries": tries})
        report.save()


# ------------------------------------------------------------------------------------------ distributed
def distributed_section(args, report: Report) -> None:
    """A 1-process torchrun of this script's worker; records pass/fail and the error line."""
    if report.over_budget():
        report.skip("distributed")
        return
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(Path(__file__).resolve()), "--distributed_worker", str(result_path),
               "--device", args.device.type]
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.distributed_timeout_s)
            returncode, stderr = out.returncode, out.stderr
        except subprocess.TimeoutExpired:
            returncode, stderr = None, f"timed out after {args.distributed_timeout_s}s"
        worker = json.loads(result_path.read_text()) if result_path.is_file() else {}
    errors = [line for line in stderr.splitlines() if "Error" in line or "error" in line]
    r = {"backend": worker.get("backend"), "returncode": returncode, "seconds": time.perf_counter() - start,
         "checks": worker.get("checks", {}), "passed": returncode == 0 and worker.get("passed", False)}
    if not r["passed"]:
        r["error"] = worker.get("error") or (errors[-1] if errors else stderr.strip()[-300:])
    report.data["distributed"] = r
    report.log(f"distributed (torchrun, 1 process, {r['backend'] or 'backend unknown'}): "
               f"{'PASS' if r['passed'] else 'FAIL: ' + str(r.get('error'))}")
    report.save()


def distributed_worker(result_path: str, device_type: str) -> None:
    """Runs under torchrun: NCCL (gloo on CPU) collectives, a DDP training step, the gathered loss."""
    import torch.distributed as dist

    result = {"passed": False, "checks": {}}
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
        backend = "nccl" if device.type == "cuda" else "gloo"
        result["backend"] = backend
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, **({"device_id": device} if backend == "nccl" else {}))
        except TypeError:  # torch < 2.3 has no device_id
            dist.init_process_group(backend)
        result["checks"] = distributed_checks(device)
        result["passed"] = all(result["checks"].values())
        dist.destroy_process_group()
    except Exception as error:  # reported to the parent through the result file
        result["error"] = _error_line(error)
    Path(result_path).write_text(json.dumps(result))
    if not result["passed"]:
        sys.exit(1)


def distributed_checks(device: torch.device) -> dict:
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    rank, world = dist.get_rank(), dist.get_world_size()
    checks = {}
    x = torch.full((2, 3), float(rank + 1), device=device)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    checks["all_gather"] = all(bool((g == i + 1).all()) for i, g in enumerate(gathered))
    total = x.clone()
    dist.all_reduce(total)
    checks["all_reduce"] = bool((total == world * (world + 1) / 2).all())

    args = SimpleNamespace(latent="transformer", frames=4, words=16, device=device)
    model = build_model("tiny", args)
    ids, video, mask = random_batch("tiny", 4, args)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # as training/runner.py
    loss = ddp(ids, video, mask)["loss"]
    loss.backward()
    local_grads = [p.grad.clone() for _, p in model.trainable_parameters()]
    checks["ddp_step_finite"] = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in local_grads)
    model.zero_grad(set_to_none=True)
    # The loss over features gathered with gradient equals the DDP step's loss at world size 1.
    text = torch.cat(all_gather_with_grad(model.encode_text(ids)))
    vid = torch.cat(all_gather_with_grad(model.encode_video(video, mask)))
    gathered_loss = contrastive_loss(model.similarity(text, vid))
    gathered_loss.backward()
    checks["gathered_loss_equal"] = bool(torch.allclose(gathered_loss, loss.detach(), rtol=1e-5, atol=1e-6))
    checks["gathered_grads_equal"] = all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
                                         for (_, p), g in zip(model.trainable_parameters(), local_grads))
    return checks


# ------------------------------------------------------------------------------------------ environment
def environment(args) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "torch_cuda": torch.version.cuda, "device": str(args.device), "cpu_count": os.cpu_count(),
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    if args.device.type == "cuda":
        props = torch.cuda.get_device_properties(args.device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version())
        with contextlib.suppress(Exception):
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    env["options"] = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    return env


# ------------------------------------------------------------------------------------------ summary table
def print_summary(report: Report) -> None:
    data = report.data
    env = data["environment"]
    print(f"\n== {env.get('gpu', env['device'])}, torch {env['torch']} ==")
    print("== training step (median after warm-up) ==")
    print(f"{'arch':5} {'prec':5} {'impl':9} {'batch':>5} {'s/step':>8} {'videos/s':>9} {'peak GiB':>8}  status")
    for r in data["train"]:
        ok = r["status"] == "ok"
        step = f"{r['step_s']:8.3f} {r['videos_per_s']:9.1f}" if ok else f"{'-':>8} {'-':>9}"
        peak = f"{r['peak_mb'] / 1024:8.2f}" if ok and r["peak_mb"] is not None else f"{'-':>8}"
        print(f"{r['arch']:5} {r['precision']:5} {r['impl']:9} {r['batch']:5} {step} {peak}  {r['status']}")
    print("\n== ours vs published at equal batch ==")
    for row in data["comparisons"]:
        print(f"{row['arch']} {row['precision']} batch {row['batch']}: {describe_comparison(row)}")
    print("\n== evaluation (no gradient) ==")
    for r in data["eval"]:
        text = (f"{r['videos_per_s']:8.1f} videos/s {r['texts_per_s']:9.0f} texts/s" if r["status"] == "ok"
                else r["status"])
        print(f"{r['arch']:5} {r['precision']:5} {r['impl']:9} batch {r['batch']:4}: {text}")
    if data["stability"]:
        print(f"\n== stability ==\n{data['stability']['arch']} amp: {describe_stability(data['stability'])}")
    for m in data["max_batch"]:
        print(f"largest batch that fits: {m['arch']} {m['precision']} {m['impl']}: {m['largest_fitting_batch']}")
    if data["distributed"]:
        d = data["distributed"]
        print(f"distributed (torchrun, 1 process, {d['backend']}): {'PASS' if d['passed'] else 'FAIL: ' + str(d.get('error'))}")
    if data["skipped"]:
        print(f"skipped for time: {', '.join(data['skipped'])}")
    print(f"total {report.elapsed():.0f}s; results in {report.path}", flush=True)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    from runtime.errors import finite_float

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON written (atomically, after every step)")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny when no GPU is visible)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes and few steps (a smoke test in seconds; CI runs it on CPU)")
    parser.add_argument("--archs", help="comma-separated of " + ",".join(SHAPES) + " (default B/32,B/16)")
    parser.add_argument("--latent", choices=["linear", "transformer"], default="transformer")
    parser.add_argument("--frames", type=int, help="frames per video (default 12)")
    parser.add_argument("--words", type=int, help="caption tokens (default 32)")
    parser.add_argument("--batch", type=int, help="per-GPU training batch (default 128, the MSR-VTT recipe)")
    parser.add_argument("--min_batch", type=int, help="smallest batch tried when halving after out-of-memory")
    parser.add_argument("--eval_batch", type=int, help="evaluation batch (default --batch)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="training: comma-separated of fp32,amp,bf16")
    parser.add_argument("--eval_precisions", default="fp32,bf16", help="evaluation: comma-separated of fp32,amp,bf16")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated of " + ",".join(IMPLS))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated of " + ",".join(SECTIONS))
    parser.add_argument("--warmup", type=int, help="untimed steps per measurement (default 2)")
    parser.add_argument("--iters", type=int, help="timed steps per measurement; the median is reported (default 5)")
    parser.add_argument("--lr", type=finite_float, default=1e-4)
    parser.add_argument("--stability_steps", type=int, help="AMP + GradScaler steps of the NaN/inf check (default 200)")
    parser.add_argument("--stability_batch", type=int, help="(default 32)")
    parser.add_argument("--stability_time_s", type=finite_float, default=60)
    parser.add_argument("--max_batch_precision", choices=PRECISIONS, default="amp")
    parser.add_argument("--max_batch_limit", type=int, help="largest batch tried (default 2048)")
    parser.add_argument("--max_batch_time_s", type=finite_float, default=40, help="per architecture")
    parser.add_argument("--distributed_timeout_s", type=int, default=120)
    parser.add_argument("--time_budget_s", type=finite_float, default=420,
                        help="sections not started by then are skipped (the running measurement finishes)")
    parser.add_argument("--distributed_worker", metavar="RESULT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (dict(archs="tiny", batch=4, min_batch=2, eval_batch=4, warmup=1, iters=2, stability_steps=5,
                     stability_batch=4, max_batch_limit=8, frames=4, words=16) if args.tiny else
                dict(archs="B/32,B/16", batch=128, min_batch=8, warmup=2, iters=5, stability_steps=200,
                     stability_batch=32, max_batch_limit=2048, frames=12, words=32))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.eval_batch = args.eval_batch or args.batch
    if args.device is None:
        if not torch.cuda.is_available() and not args.tiny:
            parser.error(f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA device; "
                         "use --device cpu --tiny for the smoke run (or --device cpu for full shapes on CPU)")
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    for name, allowed in (("archs", SHAPES), ("precisions", PRECISIONS), ("eval_precisions", PRECISIONS),
                          ("impls", IMPLS), ("sections", SECTIONS)):
        chosen = [c for c in getattr(args, name).split(",") if c]
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {list(allowed)}")
        setattr(args, name + "_list" if name not in ("archs", "sections") else name, chosen)
    args.precision_list, args.eval_precision_list, args.impl_list = args.precisions_list, args.eval_precisions_list, args.impls_list
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    return args


def run_architecture(arch: str, args, report: Report, first: bool) -> None:
    report.log(f"building DGL on a random {arch} CLIP ({args.latent} latent space, {args.frames} frames)")
    model = build_model(arch, args)
    try:
        if "train" in args.sections:
            train_section(model, arch, args, report)
        if "eval" in args.sections:
            eval_section(model, arch, args, report)
        if "stability" in args.sections and first:
            stability_section(model, arch, args, report)
        if "max_batch" in args.sections:
            max_batch_section(model, arch, args, report)
    finally:
        del model
        free_memory()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.distributed_worker:
        distributed_worker(args.distributed_worker, args.device.type)
        return {}
    report = Report(args.out, args.time_budget_s)
    report.data["environment"] = env = environment(args)
    report.log(f"torch {env['torch']} (CUDA {env['torch_cuda']}), device {env.get('gpu', args.device)}"
               f"{', %s GiB' % env['gpu_memory_gib'] if 'gpu_memory_gib' in env else ''}, NCCL {env.get('nccl', '-')}; "
               f"budget {args.time_budget_s:.0f}s")
    report.save()
    if "distributed" in args.sections:
        distributed_section(args, report)
    for i, arch in enumerate(args.archs):
        if report.over_budget():
            report.skip(f"everything for {arch}")
            continue
        try:
            run_architecture(arch, args, report, first=i == 0)
        except Exception as error:  # building the model failed (e.g. out of memory): go on with the next
            report.data.setdefault("errors", []).append({"arch": arch, "error": _error_line(error)})
            report.log(f"{arch}: {_error_line(error)}")
            free_memory()
    report.data["finished"] = True
    report.save()
    print_summary(report)
    return report.data


if __name__ == "__main__":
    main()
