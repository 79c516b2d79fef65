"""The demo's comparison: text-to-video R@1 / R@5 and the order probe, for the frozen CLIP with frames
mean-pooled (zero-shot) and for trained DGL models, on one split of the synthetic dataset.

The order probe is a minimal-pair test: for each video, its true caption ("moves left then up") and
the same caption with the two moves swapped ("moves up then left") are scored against the video; the
probe is the share of videos whose true caption scores higher (a tie counts one half, so a model
blind to order is at 50 %). The reversed-video metric (main.py's order metric) is the video-side
counterpart: the share of videos that score above themselves with their frames reversed, against their
caption.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataloaders.video import load_video
from modules.metrics import compute_metrics
from modules.order import frame_orders, order_win_rate, reorder_frames
from modules.tokenizer import tokenize


@dataclass
class EvalSplit:
    video_ids: list[str]
    captions: list[str]      # caption i describes video i
    swapped: list[str]       # caption i with its two moves exchanged
    paths: list[str]


def read_split(retrieval_csv: str, probe_csv: str, videos_dir: str, split: str) -> EvalSplit:
    """Videos and captions of a retrieval file (test layout) and each caption's swapped twin."""
    with open(retrieval_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(probe_csv, newline="", encoding="utf-8") as f:
        twin = {(r["split"], r["video_id"]): r for r in csv.DictReader(f)}
    swapped = []
    for r in rows:
        t = twin.get((split, r["video_id"]))
        if t is None or t["caption"] != r["sentence"]:
            raise ValueError(f"{probe_csv}: no swapped caption for {split} video {r['video_id']} "
                             f"({r['sentence']!r})")
        swapped.append(t["swapped"])
    return EvalSplit([r["video_id"] for r in rows], [r["sentence"] for r in rows], swapped,
                     [os.path.join(videos_dir, r["video_id"] + ".mp4") for r in rows])


def order_probe(true_scores: torch.Tensor, swapped_scores: torch.Tensor) -> float:
    """% of videos whose true caption scores above its swapped twin; a tie counts one half."""
    true_scores, swapped_scores = torch.as_tensor(true_scores), torch.as_tensor(swapped_scores)
    if true_scores.shape != swapped_scores.shape or true_scores.ndim != 1:
        raise ValueError("need one true and one swapped score per video")
    wins = (true_scores > swapped_scores).double() + 0.5 * (true_scores == swapped_scores).double()
    return 100.0 * wins.mean().item()


def scores(text_true: torch.Tensor, text_swapped: torch.Tensor, videos: torch.Tensor,
           reversed_videos: torch.Tensor | None = None) -> dict:
    """R@1, R@5 (text to video, caption i <-> video i), the order probe and (given the features of the
    videos with their frames reversed) the reversed-video metric (ties within float rounding count one half)."""
    t, s, v = (F.normalize(x.float(), dim=-1) for x in (text_true, text_swapped, videos))
    sim = t @ v.t()
    m = compute_metrics(sim)
    out = {"R1": m["R1"], "R5": m["R5"], "order": order_probe((t * v).sum(-1), (s * v).sum(-1)), "sim": sim}
    if reversed_videos is not None:
        r = F.normalize(reversed_videos.float(), dim=-1)
        out["reversed"] = order_win_rate((t * v).sum(-1), (t * r).sum(-1))["percent"]
    return out


def _videos(split: EvalSplit, max_frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    clips = [load_video(p, max_frames, size, train=False) for p in split.paths]
    return torch.stack([c.video for c in clips]), torch.stack([c.mask for c in clips])


def _reversed(video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return reorder_frames(video, frame_orders(mask, "reverse"))


@torch.no_grad()
def zero_shot(clip, tokenizer, split: EvalSplit, max_frames: int, max_words: int) -> dict:
    """The frozen CLIP alone: each frame encoded as an image, the video the mean of its frames."""
    clip.eval()
    video, mask = _videos(split, max_frames, clip.config.image_resolution)
    B, T = video.shape[:2]
    w = mask.float().unsqueeze(-1)

    def pooled_frames(v):
        frames = F.normalize(clip.encode_image(v.flatten(0, 1)), dim=-1).view(B, T, -1)
        return (frames * w).sum(1) / w.sum(1).clamp_min(1)

    def text(captions):
        return clip.encode_text(tokenize(captions, max_words=max_words, tokenizer=tokenizer))

    return scores(text(split.captions), text(split.swapped), pooled_frames(video),
                  pooled_frames(_reversed(video, mask)))


@torch.no_grad()
def trained_dgl(model, tokenizer, split: EvalSplit) -> dict:
    """A DGL model (prompts trained): its text and video features."""
    model.eval()
    cfg = model.config
    video, mask = _videos(split, cfg.max_frames, model.image_resolution)
    prompts = model.prompts()

    def encode(v):
        return torch.cat([model.encode_video(v[i:i + 32], mask[i:i + 32], prompts) for i in range(0, len(v), 32)])

    def text(captions):
        return model.encode_text(tokenize(captions, max_words=cfg.max_words, tokenizer=tokenizer), prompts)

    return scores(text(split.captions), text(split.swapped), encode(video), encode(_reversed(video, mask)))


def format_table(rows: list[tuple[str, dict]], num_videos: int, split: str = "test") -> str:
    """The comparison table (markdown, so that it can be pasted as printed)."""
    lines = [f"| model ({num_videos} {split} videos) | t2v R@1 | t2v R@5 | order probe | reversed video |",
             "|---|---|---|---|---|",
             f"| chance | {100.0 / num_videos:.1f} | {min(100.0, 500.0 / num_videos):.1f} | 50.0 | 50.0 |"]
    lines += [f"| {name} | {r['R1']:.1f} | {r['R5']:.1f} | {r['order']:.1f} | "
              + (f"{r['reversed']:.1f} |" if r.get("reversed") is not None else "- |") for name, r in rows]
    return "\n".join(lines)
