"""Which kernels compute the model on this machine, each chosen by a measurement or a numerical check.

* fp32 matrix products: PyTorch sends fp32 products to MKL unless oneDNN may compute them in a
  reduced precision (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). On CPUs without
  AMX oneDNN then still computes in fp32, often much faster than MKL; on CPUs with AMX it computes
  in bf16. So the setting is taken only when a check against float64 shows fp32 accuracy (an error
  no larger than a few times MKL's own), and used where the model's own timing shows it faster.
* Attention: the CPU's flash-attention kernel and the plain ("math") composition of matrix products
  differ in speed by shape and precision; math is a candidate where the bare call at the model's own
  attention shape is faster with it.
* Per use: the candidates are timed on the model's own training step and evaluation forward, and a use
  computes with a candidate only where it beat PyTorch's defaults there (a single product or attention
  call does not tell what the whole model does: :func:`choose_for_use`).
* bf16: with bf16 autocast everywhere, the frozen backbone's matrices can be stored in bf16 once,
  instead of autocast casting every frozen weight again at every call. Only the tensors that autocast
  would cast to bf16 anyway are stored so, which gives the same numbers as plain bf16 autocast. The
  fp32 values are kept: checkpoints still hold them, and loading a checkpoint updates them.

For a user of the Python API, :func:`tune` makes the same choices ``main.py`` makes at start-up, for a
model, a device and a precision, and returns a :class:`Tuning` whose contexts compute under them and
whose ``restore()`` undoes them (``runtime.cpu`` calls it for ``main.py`` and ``search_videos.py``)::

    tuning = modules.backends.tune(model, device="cpu", precision="bf16")
    with torch.no_grad(), tuning.inference():
        video_features = model.encode_video(video, mask)
    tuning.restore()  # or: with modules.backends.tune(model) as tuning: ...

Nothing here runs at import. Every setting is process-global; ``restore()`` undoes them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH, FLASH = SDPBackend.MATH, SDPBackend.FLASH_ATTENTION


# oneDNN's fp32 result may differ from MKL's by rounding only: its error against float64 must stay
# within this factor of MKL's (a product computed in bf16 is ~1000x worse).
EXACT_ERROR_FACTOR = 8.0


# oneDNN must be this much faster than MKL to replace it (timings are noisy).
MIN_SPEEDUP = 1.05


# The math backend replaces PyTorch's own choice (flash) only when this much faster on the bare call: the
# call alone misses costs around it (math writes the whole attention matrix). Measured on a 2-core Zen 5:
# math 3.2x (fp32 forward), 6.7x (fp32 forward + backward), 4x (bf16 forward + backward) faster, and
# 1.2x on the bare bf16 forward, where the model's forward was 10 % slower with math.
MATH_MIN_SPEEDUP = 1.5


_undo: list = []  # callables that restore what this module changed, newest last


def set_threads(threads: int, undo: list | None = None) -> None:
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
        (_undo if undo is None else undo).append(lambda: torch.set_num_threads(before))


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up (kernel selection, caches)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _timed_rounds(fns: dict, rounds: int) -> dict:
    """{name: [seconds of round 1, ...]}: each callable timed once per round, the rounds interleaved (every
    callable once, then again) so that load drifts hit all alike, after one warm-up call of each."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _compare(fns: dict, repeats: int = 3) -> dict:
    """Best time of each callable over ``repeats`` interleaved rounds."""
    return {name: min(times) for name, times in _timed_rounds(fns, repeats).items()}


@contextlib.contextmanager
def fp32_precision(setting: str):
    """Within: oneDNN's fp32 product precision ``setting`` ("ieee": exact fp32, "bf16": oneDNN may compute
    in bf16), the process's setting back on leaving."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = setting
    try:
        yield
    finally:
        matmul.fp32_precision = before


@contextlib.contextmanager
def onednn_fp32(enabled: bool = True):
    """Within: fp32 matrix products go to oneDNN (which may compute them in bf16; check first)."""
    with fp32_precision("bf16" if enabled else "ieee"):
        yield


@contextlib.contextmanager
def fp32_path_context(path: str):
    """Within: fp32 products on ``path`` ("onednn" / "mkl"), the process's setting back on leaving."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    with fp32_precision("bf16" if path == "onednn" else ("ieee" if before == "bf16" else before)):
        yield


def _products(generator: torch.Generator) -> list:
    """The product kinds the model uses (linear layers, 3-D matmul, attention bmm) at its sizes."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    x, w, b = rand(2, 200, 768), rand(3072, 768), rand(3072)
    h, wt = rand(400, 3072), rand(768, 3072)
    q, k = rand(24, 50, 64), rand(24, 54, 64)
    return [
        ("linear", lambda dt: F.linear(x.to(dt), w.to(dt), b.to(dt))),
        ("mm", lambda dt: h.to(dt) @ wt.to(dt).t()),
        ("bmm", lambda dt: torch.bmm(q.to(dt), k.to(dt).transpose(1, 2))),
    ]


def _relative_error(product) -> float:
    exact = product(torch.float64)
    return float((product(torch.float32).double() - exact).abs().max() / exact.abs().max())


@dataclass
class Fp32Check:
    exact: bool  # oneDNN's fp32 products are as accurate as MKL's
    error_mkl: float  # worst relative error against float64 over the checked products
    error_onednn: float
    speedup: float  # oneDNN's rate / MKL's on a model-sized linear layer (0 when not timed)
    given: str | None = None  # "onednn" / "mkl" asked for by the caller (a recorded choice), else None

    @property
    def use_onednn(self) -> bool:
        if self.given is not None:  # a recorded choice replaces the timing, never the accuracy check
            return self.exact and self.given == "onednn"
        return self.exact and self.speedup >= MIN_SPEEDUP

    @property
    def path(self) -> str:
        return "onednn" if self.use_onednn else "mkl"

    def describe_check(self) -> str:
        """What the accuracy check and the single-product timing found (the per-use choice is timed apart)."""
        if self.error_onednn != self.error_onednn:
            return "fp32 products through oneDNN: not possible with this PyTorch"
        if not self.exact:
            return (f"fp32 products through oneDNN: reduced precision here (error {self.error_onednn:.1e} against "
                    f"float64, MKL {self.error_mkl:.1e}): MKL only")
        return (f"fp32 products through oneDNN: exact here (error {self.error_onednn:.1e} against float64, MKL "
                f"{self.error_mkl:.1e}), {self.speedup:.2f}x MKL's rate on one product")

    def describe(self) -> str:
        path = "oneDNN" if self.use_onednn else "MKL"
        if self.given is not None:
            return f"fp32 matrix products: {path} (recorded: {self.given}; oneDNN exact here: {self.exact})"
        if self.error_onednn != self.error_onednn:  # nan: not checked
            why = "this PyTorch cannot route fp32 products to oneDNN"
        elif not self.exact:
            why = (f"oneDNN computes them in reduced precision here (error {self.error_onednn:.1e} against "
                   f"float64, MKL {self.error_mkl:.1e})")
        else:
            why = (f"oneDNN is exact here (error {self.error_onednn:.1e} against float64, MKL "
                   f"{self.error_mkl:.1e}) and {self.speedup:.2f}x as fast")
        return f"fp32 matrix products: {path} ({why})"


def check_onednn_fp32() -> Fp32Check:
    """Whether oneDNN's fp32 products keep fp32 accuracy (against float64) and are faster than MKL's."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(matmul, "fp32_precision"):
        return Fp32Check(exact=False, error_mkl=float("nan"), error_onednn=float("nan"), speedup=0.0)
    products = _products(torch.Generator().manual_seed(0))
    error = {}
    for on in (False, True):
        with onednn_fp32(on):
            error[on] = max(_relative_error(p) for _, p in products)
    exact = error[True] <= EXACT_ERROR_FACTOR * max(error[False], 1e-9)
    speedup = 0.0
    if exact:
        x, w = torch.randn(1024, 768), torch.randn(3072, 768)

        def timed(on):
            def run():
                with onednn_fp32(on):
                    F.linear(x, w)
            return run
        times = _compare({"mkl": timed(False), "onednn": timed(True)})
        speedup = times["mkl"] / times["onednn"]
    return Fp32Check(exact=exact, error_mkl=error[False], error_onednn=error[True], speedup=speedup)


@functools.lru_cache(maxsize=None)
def _cached_fp32_check(threads: int) -> Fp32Check:
    return check_onednn_fp32()


def choose_fp32_path(undo: list | None = None, given: str | None = None) -> Fp32Check:
    """Check oneDNN (once per process and thread count) and route fp32 products there if it pays, or,
    with ``given`` ("onednn" / "mkl": an earlier run's choice), as given where oneDNN is exact."""
    check = _cached_fp32_check(torch.get_num_threads())
    if given is not None:
        if given not in ("onednn", "mkl"):
            raise ValueError(f"fp32 path must be 'onednn' or 'mkl', got {given!r}")
        check = dataclasses.replace(check, given=given)
    if check.use_onednn:
        matmul = torch.backends.mkldnn.matmul
        before = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        (_undo if undo is None else undo).append(lambda: setattr(matmul, "fp32_precision", before))
    return check


def backends_context(backends: list | None):
    """sdpa_kernel(backends), or nothing for None (PyTorch's own choice)."""
    return contextlib.nullcontext() if backends is None else sdpa_kernel(backends)


def compute_context(device_type: str, dtype: torch.dtype | None, backends: list | None, fp32_path: str | None = None):
    """Autocast to ``dtype`` (None: none, fp32) under the attention ``backends`` (None: PyTorch's choice) and,
    on CPU, the fp32 product path ``fp32_path`` ("onednn" / "mkl"; None: as set for the process)."""
    stack = contextlib.ExitStack()
    if dtype is not None:
        stack.enter_context(torch.autocast(device_type=device_type, dtype=dtype))
    stack.enter_context(backends_context(backends))
    if fp32_path is not None and device_type == "cpu":
        stack.enter_context(fp32_path_context(fp32_path))
    return stack


def current_attention_backends() -> list:
    """The attention backends enabled now, in their priority order (as ``sdpa_kernel`` left them)."""
    try:
        from torch.nn.attention import _cur_sdpa_kernel_backends
        return _cur_sdpa_kernel_backends(with_priority=True)
    except (ImportError, TypeError):  # a PyTorch without the helper: the public per-backend switches
        cuda = torch.backends.cuda
        switches = ((SDPBackend.CUDNN_ATTENTION, "cudnn_sdp_enabled"), (FLASH, "flash_sdp_enabled"),
                    (SDPBackend.EFFICIENT_ATTENTION, "mem_efficient_sdp_enabled"), (MATH, "math_sdp_enabled"))
        return [b for b, name in switches if getattr(cuda, name, lambda: False)()]


def same_attention_backends():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: the recomputation in the backward pass runs
    under the attention backends of the forward pass. The backward usually runs outside the forward's
    ``sdpa_kernel`` block, where PyTorch's own choice may take another kernel, which saves other tensors
    (checkpoint then stops with CheckpointError) or rounds differently."""
    backends = current_attention_backends()
    return contextlib.nullcontext(), sdpa_kernel(backends, set_priority=True)


def _attention_timer(shape, dtype, backends, train: bool):
    """A callable running the attention of ``shape`` = (N, H, Lq, Lk, d) under ``backends``."""
    n, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, length, d, generator=g).to(dtype) for length in (lq, lk, lk))
    if train:
        for t in (q, k, v):
            t.requires_grad_(True)
    grad = torch.randn(n, h, lq, d, generator=g).to(dtype)

    def run():
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v)
            if train:
                torch.autograd.grad(out, (q, k, v), grad)
    return run


def measure_attention(shape, dtype: torch.dtype) -> dict:
    """Seconds of each backend on one attention ``shape``: {(backend name, "eval"|"train"): s}."""
    timers = {}
    for name, backends in (("math", [MATH]), ("flash", [FLASH, MATH])):
        for direction in ("eval", "train"):
            timers[(name, direction)] = _attention_timer(shape, dtype, backends, direction == "train")
    return _compare(timers, repeats=5)


@functools.lru_cache(maxsize=None)
def _cached_attention_times(shape: tuple, dtype: torch.dtype, threads: int) -> dict:
    return measure_attention(shape, dtype)


def choose_attention(shape, dtype: torch.dtype) -> tuple[list, list, dict]:
    """(eval backends, train backends, times) for the model's local attention ``shape`` (measured once
    per process, shape, dtype and thread count)."""
    times = _cached_attention_times(tuple(shape), dtype, torch.get_num_threads())

    def pick(direction):
        flash, math = times[("flash", direction)], times[("math", direction)]
        return [MATH] if flash >= MATH_MIN_SPEEDUP * math else [FLASH, MATH]
    return pick("eval"), pick("train"), times


def local_attention_shape(model, frames_per_call: int | None = None) -> tuple:
    """(N, H, Lq, Lk, d) of one video's local attention: every frame over [global tokens, its own]."""
    cc, config = model.clip.config, model.config
    tokens = 1 + config.local_each_frame_prompt_length + cc.num_patches
    heads = cc.vision_heads
    return (frames_per_call or config.max_frames, heads, tokens,
            config.global_visual_prompt_length + tokens, cc.vision_width // heads)


PYTORCH_CHOICE = "PyTorch's choice"


def backend_name(backends: list | None) -> str:
    if backends is None:
        return PYTORCH_CHOICE
    return "math" if backends == [MATH] else "flash"


def backends_from_name(name: str) -> list | None:
    """The inverse of :func:`backend_name`: "math", "flash" (flash, math where flash cannot run) or
    PyTorch's choice (None)."""
    table = {"math": [MATH], "flash": [FLASH, MATH], PYTORCH_CHOICE: None}
    if name not in table:
        raise ValueError(f"unknown attention backend {name!r} (expected math, flash or {PYTORCH_CHOICE!r})")
    return table[name]


def autocast_cast_tensors(clip: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of the frozen parameters that bf16 autocast casts at every use: weights and
    biases of linear layers and attention projections, and the output projections (used by matmul).
    conv1 stays fp32: its dtype sets the dtype of the residual stream, which autocast keeps in fp32."""
    found = []
    for module in clip.modules():
        if isinstance(module, nn.Linear):
            found += [(module, "weight")] + ([(module, "bias")] if module.bias is not None else [])
        for name in ("in_proj_weight", "in_proj_bias", "proj", "text_projection"):
            if isinstance(getattr(module, name, None), nn.Parameter) and not isinstance(module, nn.Linear):
                found.append((module, name))
    return found


class Bf16Backbone:
    """Stores a frozen backbone's autocast-cast tensors in bf16; checkpoints still see the fp32 values."""

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        names = {id(p): n for n, p in backbone.named_parameters()}
        self.targets = {names[id(getattr(m, a))]: (m, a) for m, a in autocast_cast_tensors(backbone)
                        if not getattr(m, a).requires_grad}
        self.fp32 = {}  # name -> fp32 tensor, the values checkpoints hold
        for name, (module, attr) in self.targets.items():
            p = getattr(module, attr)
            self.fp32[name] = p.detach().float().clone()
            p.data = p.data.to(torch.bfloat16)
        # functions, not bound methods: torch marks its hooks with an attribute
        self._hooks = [backbone.register_state_dict_post_hook(lambda *a: self._fp32_in_state_dict(*a)),
                       backbone.register_load_state_dict_pre_hook(lambda *a: self._keep_loaded_fp32(*a))]

    def _fp32_in_state_dict(self, module, state_dict, prefix, local_metadata):
        for name, value in self.fp32.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = value.to(state_dict[prefix + name].device)

    def _keep_loaded_fp32(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
        for name in self.fp32:
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.shape == self.fp32[name].shape:
                self.fp32[name] = value.detach().float().cpu().clone()

    def restore(self) -> None:
        """Back to fp32 parameters (the kept values)."""
        for hook in self._hooks:
            hook.remove()
        for name, (module, attr) in self.targets.items():
            p = getattr(module, attr)
            p.data = self.fp32[name].to(p.device)

    def __len__(self) -> int:
        return len(self.targets)


def store_backbone_in_bf16(model, undo: list | None = None) -> Bf16Backbone:
    """Store ``model.clip``'s frozen matrices in bf16 (until ``restore()``)."""
    stored = Bf16Backbone(model.clip)
    (_undo if undo is None else undo).append(stored.restore)
    return stored


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16); None when it cannot be told.

    Without either, bf16 autocast on CPU is emulated and slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return None
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_speedup() -> float:
    """Rate of a model-sized bf16 product over the fp32 one (on the fp32 path now set). Emulated bf16
    (no AVX512-BF16, no AMX) runs at about a third of fp32; native bf16 at 1.5-2x (AVX512-BF16) or more."""
    x, w = torch.randn(1024, 768), torch.randn(768, 3072)
    xb, wb = x.bfloat16(), w.bfloat16()
    times = _compare({"fp32": lambda: x @ w, "bf16": lambda: xb @ wb})
    return times["fp32"] / times["bf16"]


# bf16 at under this fraction of the fp32 rate is emulated (timing noise stays well above it)
EMULATED_BF16 = 0.7


def restore() -> None:
    """Undo every process-global setting made here (newest first)."""
    while _undo:
        _undo.pop()()


# ------------------------------------------------------------------------------------------ per use
USES = ("train", "eval")  # the training step (forward + backward) and the evaluation forward (videos)

# A candidate replaces the default kernels of a use only when its time on the whole forward (evaluation) or
# training step is at least this much better than the default's there: ties and noise keep the default, so
# that no use is computed with kernels whose own timing lost. Measured on 2 cores of an AMD EPYC (AVX512-BF16,
# no AMX), where the single-product and single-attention timings picked oneDNN and math attention that made
# the whole fp32 evaluation forward 0.87x as fast as PyTorch's defaults.
MODEL_MIN_SPEEDUP = 1.02

# Interleaved rounds of the whole-model timing (after one warm-up call of each candidate). A candidate must beat
# the default by MODEL_MIN_SPEEDUP in every round, each round's times compared with each other: on a shared
# 2-core AMD EPYC (AVX2) the same kernels timed 0.89-1.09 s from one process to the next, so a best-of-rounds
# comparison took a tie for a win about as often as not.
MODEL_TIMING_ROUNDS = 3

# Videos per timed call (at most the run's own batch): per-frame shapes are the run's whatever the batch.
MODEL_TIMING_BATCH = 2


def candidate_name(fp32: str, attention: list | None) -> str:
    return f"{fp32} + {backend_name(attention)}"


@dataclass
class UseChoice:
    """The kernels of one use (``train`` or ``eval``) and how they were chosen."""
    fp32: str  # "onednn" / "mkl"
    attention: list | None  # None: PyTorch's choice
    source: str  # "measured", "recorded", "default (nothing else to try)"
    seconds: dict = dataclasses.field(default_factory=dict)  # candidate name -> best time of the timed call

    @property
    def name(self) -> str:
        return candidate_name(self.fp32, self.attention)

    def record(self) -> dict:
        """As checkpoints, run records and indexes keep it (JSON)."""
        return {"fp32_products": self.fp32, "attention": backend_name(self.attention), "source": self.source,
                "seconds": {k: round(v, 6) for k, v in self.seconds.items()}}

    def describe(self, use: str) -> str:
        what = {"train": "training step", "eval": "evaluation forward"}[use]
        line = (f"{what}: fp32 matrix products {self.fp32}, attention backend {backend_name(self.attention)} "
                f"({self.source}")
        if self.seconds:
            line += "; " + ", ".join(f"{k} {v:.3f}s" for k, v in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        return line + ")"


def recorded_choice(record: dict) -> tuple[str, list | None]:
    """(fp32 path, attention backends) of a :meth:`UseChoice.record` (ValueError when malformed)."""
    fp32 = record.get("fp32_products")
    if fp32 not in ("onednn", "mkl"):
        raise ValueError(f"fp32 path must be 'onednn' or 'mkl', got {fp32!r}")
    return fp32, backends_from_name(record.get("attention"))


def timing_inputs(model, batch: int, device: torch.device):
    """Token ids, videos and masks of ``batch`` samples at the model's own sizes (for timing only)."""
    cc, config = model.clip.config, model.config
    g = torch.Generator().manual_seed(0)
    res = cc.image_resolution
    video = torch.randn(batch, config.max_frames, 3, res, res, generator=g)
    ids = torch.randint(1, cc.vocab_size - 1, (batch, config.max_words), generator=g)
    ids[:, -1] = cc.vocab_size - 1  # end of text: the largest id
    mask = torch.ones(batch, config.max_frames, dtype=torch.long)
    return ids.to(device), video.to(device), mask.to(device)


def use_runner(model, use: str, dtype, inputs, fp32: str, attention: list | None):
    """A callable computing ``use`` once under the given kernels: the video encoder's forward (``eval``), or
    the text and video encoders' forward and the prompts' gradients of a contrastive loss (``train``; the
    gradients are returned, never stored in ``.grad``)."""
    ids, video, mask = inputs
    params = [p for _, p in model.trainable_parameters() if p.requires_grad]
    device_type = video.device.type

    def run():
        with compute_context(device_type, dtype, attention, fp32):
            if use == "eval":
                with torch.no_grad():
                    model.encode_video(video, mask)
                return
            prompts = model.prompts()
            sim = model.similarity(model.encode_text(ids, prompts), model.encode_video(video, mask, prompts))
            loss = sim.logsumexp(0).sum() + sim.logsumexp(1).sum() - 2 * sim.diagonal().sum()
            torch.autograd.grad(loss, params, allow_unused=True)
    return run


def time_candidates(runs: dict, rounds: int) -> dict:
    """The whole-model timing of the candidates: {name: [seconds of round 1, ...]} (tests replace it)."""
    return _timed_rounds(runs, rounds)


def _per_round(times, rounds: int) -> list:
    """A timing's rounds as a list (a single number: the same time in every round)."""
    return [float(times)] * rounds if isinstance(times, (int, float)) else [float(t) for t in times]


def _gains_over_default(per_round: dict, default: str, name: str) -> list:
    """The default's time over ``name``'s, round by round (a round's times were taken back to back)."""
    return [d / t for d, t in zip(per_round[default], per_round[name])]


def choose_for_use(model, use: str, dtype, fp32_options: list, attention_options: list, batch: int,
                   rounds: int = MODEL_TIMING_ROUNDS) -> UseChoice:
    """Time every combination of the options on ``use`` itself; a combination replaces the first one (the
    default) only if it is faster by :data:`MODEL_MIN_SPEEDUP` in every round; of those, the one with the
    largest smallest gain. Else the default."""
    candidates = [(f, a) for f in fp32_options for a in attention_options]
    default = candidates[0]
    if len(candidates) == 1:
        return UseChoice(default[0], default[1], "default (nothing else to try)")
    device = next(model.parameters()).device
    inputs = timing_inputs(model, batch, device)
    runs = {candidate_name(*c): use_runner(model, use, dtype, inputs, *c) for c in candidates}
    was_training = model.training
    model.train(use == "train")
    try:
        with torch.random.fork_rng(devices=[]):
            timed = time_candidates(runs, rounds)
    finally:
        model.train(was_training)
    per_round = {name: _per_round(t, rounds) for name, t in timed.items()}
    worst_gain = {candidate_name(*c): min(_gains_over_default(per_round, candidate_name(*default), candidate_name(*c)))
                  for c in candidates[1:]}
    winners = [c for c in candidates[1:] if worst_gain[candidate_name(*c)] >= MODEL_MIN_SPEEDUP]
    best = max(winners, key=lambda c: worst_gain[candidate_name(*c)]) if winners else default
    return UseChoice(best[0], best[1], "measured", {name: min(ts) for name, ts in per_round.items()})


# ------------------------------------------------------------------------------------------ the library call
PRECISIONS = {"fp32": (None, None), "bf16": (torch.bfloat16, torch.bfloat16)}


class Tuning:
    """The kernel choices made for one model on one device (see :func:`tune`).

    ``autocast()``: the training forward (and the backward it records) under the training dtype and
    kernels; ``inference()``: encoding under the evaluation ones. ``choices``: the :class:`UseChoice` of each
    use (``train``, ``eval``). ``restore()`` undoes every setting made (threads, fp32 product path, bf16
    storage), newest first; also on leaving ``with``.
    """

    def __init__(self, device: torch.device, train_dtype, eval_dtype, eval_text_dtype=None):
        self.device = device
        self.train_dtype, self.eval_dtype = train_dtype, eval_dtype
        self.eval_text_dtype = eval_dtype if eval_text_dtype is None else eval_text_dtype
        self.fp32: Fp32Check | None = None  # oneDNN's accuracy check (and its single-product timing)
        self.choices: dict[str, UseChoice] = {}
        self.train_attention: list | None = None  # None: PyTorch's choice
        self.eval_attention: list | None = None
        self.train_fp32: str | None = None  # None: the process's setting
        self.eval_fp32: str | None = None
        self.attention_shape: tuple | None = None
        self.bf16_backbone: Bf16Backbone | None = None
        self._undo: list = []

    def autocast(self):
        """Training forward and backward."""
        return compute_context(self.device.type, self.train_dtype, self.train_attention, self.train_fp32)

    def inference(self):
        """Encoding videos (and texts) for retrieval."""
        return compute_context(self.device.type, self.eval_dtype, self.eval_attention, self.eval_fp32)

    def record(self) -> dict:
        """{use: UseChoice.record()} (JSON), for checkpoints, run records and indexes."""
        return {use: choice.record() for use, choice in self.choices.items()}

    def describe(self) -> list[str]:
        lines = []
        if self.fp32 is not None:
            lines.append(self.fp32.describe_check())
        if self.attention_shape is not None:
            lines.append(f"attention shape {'x'.join(map(str, self.attention_shape))}")
        lines += [choice.describe(use) for use, choice in self.choices.items()]
        if self.bf16_backbone is not None:
            lines.append(f"bf16: {len(self.bf16_backbone)} frozen backbone tensors stored in bf16 "
                         f"(checkpoints keep them in fp32)")
        return lines

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Tuning":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _fp32_options(check: Fp32Check, dtype, given: str | None) -> list:
    if given is not None:
        if given not in ("onednn", "mkl"):
            raise ValueError(f"fp32 path must be 'onednn' or 'mkl', got {given!r}")
        return ["onednn" if given == "onednn" and check.exact else "mkl"]
    # a bf16 use computes its products in bf16 (autocast): the fp32 path is left at MKL's
    return ["mkl", "onednn"] if dtype is None and check.exact and check.speedup >= 1.0 else ["mkl"]


def _attention_options(model, dtype, use: str, given) -> tuple[list, tuple | None]:
    """The default (PyTorch's choice, or the caller's ``given`` backends) and, where the bare attention call
    is faster with it, math attention. Returns (options, the timed attention shape or None)."""
    if given != "auto":
        return [given], None
    shape = local_attention_shape(model)
    times = _cached_attention_times(tuple(shape), dtype or torch.float32, torch.get_num_threads())
    math_is_faster = times[("flash", use)] > times[("math", use)]
    return ([None, [MATH]] if math_is_faster else [None]), shape


def tune_dtypes(model, device, train_dtype=None, eval_dtype=None, eval_text_dtype=None,
                threads: int | None = None, until_restore: bool = False, pick_attention: bool = True,
                fp32_path: str | None = None, uses: tuple = USES, recorded: dict | None = None,
                attention: list | None = None, batch: int = MODEL_TIMING_BATCH,
                rounds: int = MODEL_TIMING_ROUNDS) -> Tuning:
    """:func:`tune` for given autocast dtypes (None: fp32) of training, video and text encoding; what
    ``runtime.cpu`` calls with the dtypes of ``--precision`` / ``--eval_precision``.

    ``until_restore``: the module's ``restore()`` also undoes this tuning. ``uses``: the uses to choose for
    (``("eval",)`` for a tool that only encodes); the process's fp32 path is the first use's (the backward
    pass runs outside any context). ``recorded``: {use: UseChoice.record()} of an earlier run, taken as it is
    (no timing; oneDNN only where exact here). ``pick_attention=False``: attention under ``attention``
    (the caller's backends; None: PyTorch's choice) instead of choosing. ``fp32_path`` ("onednn" / "mkl"):
    that product path for every use (oneDNN only where exact). ``batch``: videos per timed call."""
    device = torch.device(device)
    tuning = Tuning(device, train_dtype, eval_dtype, eval_text_dtype)
    if until_restore:
        _undo.append(tuning.restore)
    if threads is not None:
        set_threads(threads, tuning._undo)
    if device.type != "cpu":
        return tuning
    check = _cached_fp32_check(torch.get_num_threads())
    tuning.fp32 = check
    is_dgl = hasattr(model, "clip") and hasattr(model, "config")
    # only when every use of the backbone runs under bf16 autocast: same numbers as autocast alone
    if is_dgl and train_dtype == eval_dtype == tuning.eval_text_dtype == torch.bfloat16:
        tuning.bf16_backbone = store_backbone_in_bf16(model, tuning._undo)
    recorded = recorded or {}
    for use in uses:
        dtype = train_dtype if use == "train" else eval_dtype
        if use in recorded:
            fp32, backends = recorded_choice(recorded[use])
            choice = UseChoice("onednn" if fp32 == "onednn" and check.exact else "mkl", backends, "recorded")
        else:
            fp32_options = _fp32_options(check, dtype, fp32_path)
            if not is_dgl:
                fp32 = ("onednn" if fp32_path is None and check.use_onednn and "onednn" in fp32_options
                        else fp32_options[0])
                choice = UseChoice(fp32, None, "single-product timing")
            else:
                attention_options, shape = _attention_options(model, dtype, use,
                                                              "auto" if pick_attention else attention)
                tuning.attention_shape = shape or tuning.attention_shape
                choice = choose_for_use(model, use, dtype, fp32_options, attention_options,
                                        max(1, batch), rounds)
        tuning.choices[use] = choice
    if "train" in tuning.choices:
        tuning.train_attention, tuning.train_fp32 = tuning.choices["train"].attention, tuning.choices["train"].fp32
    if "eval" in tuning.choices:
        tuning.eval_attention, tuning.eval_fp32 = tuning.choices["eval"].attention, tuning.choices["eval"].fp32
    if tuning.choices:
        primary = tuning.choices[uses[0]].fp32
        matmul = torch.backends.mkldnn.matmul
        if primary == "onednn" and hasattr(matmul, "fp32_precision"):
            before = matmul.fp32_precision
            matmul.fp32_precision = "bf16"
            tuning._undo.append(lambda: setattr(matmul, "fp32_precision", before))
    return tuning


def tune(model, device: torch.device | str = "cpu", precision: str = "fp32", threads: int | None = None,
         batch: int = MODEL_TIMING_BATCH, uses: tuple = USES) -> Tuning:
    """Apply ``main.py``'s kernel choices for ``model`` on ``device`` in ``precision`` ("fp32" or "bf16").

    On CPU, for training and for evaluation separately: the candidates (oneDNN fp32 products where a check
    against float64 shows them exact; math attention where the bare attention call is faster) are timed on
    the model's own training step and evaluation forward (``batch`` videos), and one is kept only where it
    beat PyTorch's defaults there by 2 %; else the defaults. With "bf16", the frozen backbone's matrices are
    stored in bf16 (the results of bf16 autocast alone). fp32 results are unchanged (to rounding, 1e-5). On
    other devices only the autocast dtype is set. ``threads``: torch compute threads (default: unchanged).
    Takes a few forwards and training steps (``tuning.choices`` holds the timings; ``uses=("eval",)`` times
    the evaluation forward alone, for a program that never trains). Compute under
    ``tuning.inference()`` / ``tuning.autocast()``; ``tuning.restore()`` undoes.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    train_dtype, eval_dtype = PRECISIONS[precision]
    return tune_dtypes(model, device, train_dtype, eval_dtype, threads=threads, batch=batch, uses=uses)
