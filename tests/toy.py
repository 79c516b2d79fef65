"""Tiny in-memory retrieval data and tiny DGL models for tests and smoke runs (no files, no tokenizer).

Item i has a class c = i % num_classes: its video frames carry a class-specific colour pattern plus
noise, its caption contains class-specific tokens, so the prompts have something to learn.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket

import torch
from torch.utils.data import Dataset


# The flags of a toy run whose test is not about the kernel choice: PyTorch's default kernels (MKL fp32
# products, its own attention choice), without the start-up timing of each candidate on the model, which
# costs a toy run about as much as its training does.
FIXED_KERNELS = {"cpu_tuning": 0}


def tiny_dgl(seed: int = 0, vocab_size: int = 64, shared_latent_space: str = "linear", max_words: int = 8,
             max_frames: int = 2, width: int = 64, **overrides):
    from modules.clip import CLIP, tiny_clip_config
    from modules.dgl import DGL, DGLConfig

    torch.manual_seed(seed)
    clip = CLIP(tiny_clip_config(vocab_size=vocab_size, vision_width=width, transformer_width=width,
                                 transformer_heads=max(1, width // 64), embed_dim=32))
    cfg = dict(shared_latent_space=shared_latent_space, max_words=max_words, max_frames=max_frames,
               text_prompt_length=4, local_each_frame_prompt_length=2, global_visual_prompt_length=2,
               unified_transformer_layers=2)
    cfg.update(overrides)
    return DGL(clip, DGLConfig(**cfg))


def evaluate_moved_tiny_dgl(dataset, vocab_size: int, batch_size: int = 4) -> dict:
    """training.evaluation.evaluate (CPU, fp32) of a tiny DGL (16 words, 4 frames) whose prompts are moved well
    away from their initial values, so that its scores rank the videos rather than tie."""
    from runtime.precision import Precision
    from training.evaluation import evaluate

    model = tiny_dgl(seed=3, vocab_size=vocab_size, max_words=16, max_frames=4)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    cpu = torch.device("cpu")
    return evaluate(model, dataset, batch_size=batch_size, workers=0, device=cpu, precision=Precision("fp32", cpu),
                    progress=False)


class _Pairs(Dataset):
    def __init__(self, data: "ToyData", augment: bool = False):
        self.d = data
        self.augment = augment

    def __len__(self):
        return self.d.num_captions

    def __getitem__(self, i):
        v = int(self.d.caption_video_index[i])
        video = self.d.videos[v]
        if self.augment:  # draws from the global torch RNG, like random frame offsets do
            video = video + 0.1 * torch.randn_like(video)
        return {"input_ids": self.d.ids[i], "video": video, "video_mask": self.d.masks[v],
                "index": i, "replaced": False}

    @property
    def caption_video_index(self):
        return self.d.caption_video_index

    def text_dataset(self):
        return self.d.text_dataset()

    def video_dataset(self):
        return self.d.video_dataset()


class _Texts(Dataset):
    def __init__(self, data):
        self.d = data

    def __len__(self):
        return self.d.num_captions

    def __getitem__(self, i):
        return {"input_ids": self.d.ids[i], "caption_index": i}


class _Videos(Dataset):
    def __init__(self, data):
        self.d = data

    def __len__(self):
        return self.d.num_videos

    def __getitem__(self, i):
        return {"video": self.d.videos[i], "video_mask": self.d.masks[i], "video_index": i, "replaced": False}


class ToyData:
    """Both a training dataset (``.train()``) and a test dataset (the evaluation interface)."""

    def __init__(self, num_videos: int = 16, captions_per_video: int = 1, frames: int = 2, resolution: int = 32,
                 max_words: int = 8, vocab_size: int = 64, num_classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_videos = num_videos
        cls = torch.arange(num_videos) % num_classes
        colours = torch.rand(num_classes, 3, 1, 1, generator=g) * 2 - 1
        noise = torch.randn(num_videos, frames, 3, resolution, resolution, generator=g) * 0.5
        self.videos = (colours[cls][:, None] + noise).float()
        self.masks = torch.ones(num_videos, frames, dtype=torch.long)
        self.caption_video_index = torch.arange(num_videos).repeat_interleave(captions_per_video)
        self.num_captions = int(self.caption_video_index.numel())
        sot, eot = vocab_size - 2, vocab_size - 1
        ids = torch.zeros(self.num_captions, max_words, dtype=torch.long)
        for c in range(self.num_captions):
            v = int(self.caption_video_index[c])
            n = max_words - 2
            words = torch.randint(1, vocab_size - 2, (n,), generator=g)
            words[0] = 1 + int(cls[v])                      # class token
            words[1] = 1 + num_classes + (v % (vocab_size - 3 - num_classes))  # item token
            ids[c, 0], ids[c, 1:1 + n], ids[c, 1 + n] = sot, words, eot
        self.ids = ids

    def train(self, augment: bool = False) -> Dataset:
        return _Pairs(self, augment)

    def text_dataset(self) -> Dataset:
        return _Texts(self)

    def video_dataset(self) -> Dataset:
        return _Videos(self)


def toy_args(output_dir: str, **overrides) -> argparse.Namespace:
    """main.py's flags for a toy run (validated like the command line)."""
    from training.config import build_parser, validate

    argv = ["--output_dir", str(output_dir), "--datatype", "msrvtt", "--train_csv", "toy", "--epochs", "2",
            "--batch_size", "4", "--batch_size_val", "8", "--lr", "1e-2", "--num_thread_reader", "0",
            "--n_display", "1", "--max_words", "8", "--max_frames", "2", "--text_prompt_length", "4",
            "--local_each_frame_prompt_length", "2", "--global_visual_prompt_length", "2",
            "--unified_transformer_layers", "2", "--shared_latent_space", "linear", "--no_progress",
            "--device", "cpu", "--seed", "0"]
    for k, v in overrides.items():
        flag = "--" + k
        if isinstance(v, bool):
            if v:
                argv.append(flag)
            continue
        argv += [flag, str(v)]
    parser = build_parser()
    return validate(parser.parse_args(argv), parser)


def run_toy(output_dir: str, data_kwargs: dict | None = None, model_kwargs: dict | None = None,
            augment: bool = False, **flags) -> dict:
    """One main.py run on toy data and a tiny model (same process)."""
    from training.runner import run

    data = ToyData(**(data_kwargs or {}))
    model = tiny_dgl(**(model_kwargs or {}))
    args = toy_args(output_dir, **flags)
    return run(args, model=model, train_dataset=data.train(augment), test_dataset=data)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a gloo group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainable_grads(model) -> dict:
    """{name: gradient} of the trainable parameters that have one."""
    return {n: p.grad.clone() for n, p in model.trainable_parameters() if p.grad is not None}


def assert_same_grads(got: dict, ref: dict, rtol=1e-4) -> None:
    """Equal to float tolerance: rtol of each element, and of the tensor's largest element near zero."""
    assert set(got) == set(ref)
    assert any(g.abs().max() > 0 for g in ref.values())  # the comparison is not vacuous
    for n in ref:
        atol = max(float(ref[n].abs().max()) * 1e-5, 1e-8)
        torch.testing.assert_close(got[n], ref[n], rtol=rtol, atol=atol, msg=n)


def one_and_two_process_runs(tmp_path, steps: list, **flags) -> tuple[dict, dict]:
    """The same toy training as 1 process with batch 8 and as 2 gloo processes with batch 4 each encoding 1
    sample at a time (--contrastive_chunk_size 1); asserts the same loss at each of ``steps`` and returns the
    final state dicts (1 process, 2 processes)."""
    import pytest

    one = run_toy(str(tmp_path / "one"), batch_size=8, **flags)
    (tmp_path / "res").mkdir()
    two = run_toy_distributed(2, str(tmp_path / "two"), str(tmp_path / "res"), free_port(), batch_size=4,
                              contrastive_chunk_size=1, **flags)
    assert [s for s, _ in one["step_losses"]] == [s for s, _ in two["step_losses"]] == steps
    for (_, a), (_, b) in zip(one["step_losses"], two["step_losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    return one["model"].state_dict(), two["state"]


def exit_spawned_worker() -> None:
    """End a spawned worker whose work is done and saved without the interpreter's teardown: destructors
    of gloo's threads can abort the process there ('terminate called without an active exception'),
    which torch.multiprocessing.spawn reports as a failure although every result was written."""
    from training.distributed import exit_member

    exit_member(0)


@contextlib.contextmanager
def gloo_member(rank: int, world: int, port: int):
    """This spawned process as member ``rank`` of a ``world``-process gloo group on 127.0.0.1:``port``, with
    one compute thread. The body drops what holds the group (a DDP model, a loss and its graph) before it
    ends; then every member waits for the others and ends without the interpreter's teardown."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
        exit_spawned_worker()  # os._exit: the finally below runs only when the body failed
    finally:
        dist.destroy_process_group()


def _dist_worker(rank: int, world: int, port: int, output_dir: str, flags: dict, result_dir: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    summary = run_toy(output_dir, **flags)
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in summary["model"].state_dict().items()}
        torch.save({"state": state, "results": summary["results"], "step_losses": summary["step_losses"]},
                   os.path.join(result_dir, "rank0.pt"))
    exit_spawned_worker()


def run_toy_distributed(world: int, output_dir: str, result_dir: str, port: int, **flags) -> dict:
    """``world`` CPU processes (gloo), like torchrun; returns rank 0's final state dict and results."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(world, port, output_dir, flags, result_dir), nprocs=world, join=True)
    return torch.load(os.path.join(result_dir, "rank0.pt"), weights_only=False)
