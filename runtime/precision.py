"""Autocast settings of a run (--precision, --eval_precision) on a device, and the attention backends to
compute under (chosen in ``runtime.cpu``)."""
from __future__ import annotations

import torch

from modules.backends import compute_context, cpu_has_native_bf16


class Precision:
    """Autocast settings of --precision (and --eval_precision) on a device, plus the attention backends
    to use in training and evaluation (None: PyTorch's choice; runtime.cpu measures them on CPU)."""

    def __init__(self, precision: str, device: torch.device, eval_precision: str | None = None):
        self.name = precision
        self.device_type = device.type
        self.dtype = None
        self.note = None
        if precision == "amp":
            if device.type == "cuda":
                self.dtype = torch.float16
            else:
                self.dtype = torch.bfloat16
                self.note = "--precision amp on CPU: using bf16 autocast (fp16 autocast with a GradScaler needs CUDA)"
        elif precision == "bf16":
            self.dtype = torch.bfloat16
        # Evaluation runs in fp32 with --precision amp (as the published code evaluates) and in bf16 with
        # bf16; --eval_precision bf16 encodes the videos in bf16 whatever the training precision.
        self.eval_video_dtype = torch.bfloat16 if (precision == "bf16" or eval_precision == "bf16") else None
        self.eval_text_dtype = torch.bfloat16 if precision == "bf16" else None
        if eval_precision == "fp32":
            self.eval_video_dtype = self.eval_text_dtype = None
        emulated = device.type == "cpu" and cpu_has_native_bf16() is False
        if emulated and (self.dtype == torch.bfloat16 or self.eval_video_dtype == torch.bfloat16):
            self.note = ((self.note + "; ") if self.note else "") + (
                "this CPU has neither AMX nor AVX512-BF16: bf16 autocast is emulated and slower than "
                "fp32 here")
        self.use_scaler = precision == "amp" and device.type == "cuda"
        self.train_attention = None  # list of torch.nn.attention.SDPBackend, or None
        self.eval_attention = None
        self.attention_source = None  # where the backends came from, when not this process's own choice
        self.fp32_path = None  # "onednn" / "mkl" where runtime.cpu chose the CPU's fp32 product path
        self.fp32_source = None  # where that path came from, when not this process's own timing
        self.train_fp32_path = None  # per use ("onednn" / "mkl"; None: the process's setting)
        self.eval_fp32_path = None
        self.kernels = None  # {use: modules.backends.UseChoice.record()}: the choices and their timings

    def _context(self, dtype, backends, fp32_path=None):
        return compute_context(self.device_type, dtype, backends, fp32_path)

    def autocast(self):
        """Training forward (and the backward it records)."""
        return self._context(self.dtype, self.train_attention, self.train_fp32_path)

    def eval_autocast(self):
        """Text encoding at evaluation."""
        return self._context(self.eval_text_dtype, self.eval_attention, self.eval_fp32_path)

    def eval_video_autocast(self):
        """Video encoding at evaluation."""
        return self._context(self.eval_video_dtype, self.eval_attention, self.eval_fp32_path)

    def make_scaler(self):
        if not self.use_scaler:
            return None
        return torch.amp.GradScaler("cuda")
