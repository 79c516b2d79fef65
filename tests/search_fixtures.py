"""A tiny searchable world for the search tests: generated videos, a tiny CLIP file, a BPE file and
a DGL checkpoint in our format (recording its model flags)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from modules.clip import CLIP, tiny_clip_config
from modules.dgl import DGL
from modules.tokenizer import get_tokenizer, write_bpe_vocab
from preprocess.ffmpeg_tools import write_video
from preprocess.make_synthetic_dataset import make_specs, render_clip
from modules.checkpoints import FORMAT, with_module_prefix

CONFIG = dict(shared_latent_space="linear", max_words=16, max_frames=4, text_prompt_length=4,
              local_each_frame_prompt_length=2, global_visual_prompt_length=2, unified_transformer_layers=2)
NUM_VIDEOS = 6


@dataclass
class World:
    root: str
    videos: str      # folder of NUM_VIDEOS videos, half of them in a subfolder
    clip: str
    checkpoint: str
    bpe: str
    specs: list

    def model(self, checkpoint: str | None = None):
        from retrieval.model_io import load_model

        return load_model(self.clip, checkpoint or self.checkpoint, self.bpe)

    def copy_videos(self, dest: str) -> str:
        shutil.copytree(self.videos, dest)
        return dest

    def model_args(self, checkpoint: str | None = None) -> list[str]:
        return ["--clip", self.clip, "--checkpoint", checkpoint or self.checkpoint, "--bpe_path", self.bpe,
                "--device", "cpu"]


def save_checkpoint(model: DGL, path: str, bpe: str, config: dict) -> str:
    torch.save({"epoch": 1, "state_dict": with_module_prefix(model.state_dict()), "format": FORMAT,
                "config": {**config, "bpe_path": bpe}}, path)
    return path


def make_world(root: str) -> World:
    specs = make_specs(0, NUM_VIDEOS, seed=5, size=32)
    videos = os.path.join(root, "videos")
    for j, spec in enumerate(specs):
        folder = os.path.join(videos, "more") if j % 2 else videos
        write_video(os.path.join(folder, spec.video_id + ".mp4"), render_clip(spec), fps=3.0)
    bpe = write_bpe_vocab([s.caption(t) for s in specs for t in range(3)], os.path.join(root, "bpe.txt.gz"),
                          num_merges=60)
    vocab = get_tokenizer(bpe_path=bpe).vocab_size
    torch.manual_seed(0)
    clip_path = os.path.join(root, "tiny-clip.pt")
    torch.save(CLIP(tiny_clip_config(vocab_size=vocab)).state_dict(), clip_path)
    model = DGL.from_pretrained(clip_path, **CONFIG)
    with torch.no_grad():  # trained-looking prompts: not the initial values
        for _, p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_checkpoint(model, os.path.join(root, "ckpt.pth.tar"), bpe, CONFIG)
    return World(root, videos, clip_path, ckpt, bpe, specs)


SHOT_COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (200, 60, 220), (40, 220, 220)]


def render_shots(lengths_s, fps: int = 5, size: int = 32, seed: int = 0):
    """uint8 frames (T, size, size, 3) of shots ``lengths_s`` seconds long, each a flat colour of its own
    with a small square moving on it, and the cut times (seconds) between them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    frames, cuts, t = [], [], 0
    for i, length in enumerate(lengths_s):
        n = int(round(length * fps))
        colour = np.array(SHOT_COLOURS[i % len(SHOT_COLOURS)], np.uint8)
        for j in range(n):
            f = np.empty((size, size, 3), np.uint8)
            f[:] = colour
            x = (j * 2 + int(rng.integers(0, 3))) % (size - 6)
            f[10:16, x:x + 6] = 255 - colour
            frames.append(f)
        t += n
        cuts.append(t / fps)
    return np.stack(frames), cuts[:-1]


def write_shots_video(path: str, lengths_s, fps: int = 5, size: int = 32) -> tuple[str, list[float]]:
    frames, cuts = render_shots(lengths_s, fps, size)
    write_video(path, frames, fps=float(fps))
    return path, cuts


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """search_videos.py in this process: (exit status, stdout, stderr)."""
    from retrieval.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(argv, capsys, *needles) -> str:
    """Run search_videos.py; it must end with status 2 and one line ``search_videos.py: error: ...`` that
    holds every needle. Returns the line."""
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("search_videos.py: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
