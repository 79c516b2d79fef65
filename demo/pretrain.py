"""The demo's backbone: a tiny CLIP given an image-text pre-training on single frames, then frozen.

Real CLIP weights cannot be downloaded everywhere, and a random CLIP knows nothing of what a frame
shows. So the demo first trains its tiny CLIP (both towers) contrastively on single frames of the
synthetic world's training clips, each with a caption about that frame alone ("a red square shifted
left": colour, shape, side of the centre), as CLIP was trained on images and their captions. Nothing
in it sees more than one frame: motion and order are left for DGL's prompts to learn.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.video import load_video
from modules.clip import CLIP
from modules.tokenizer import tokenize
from preprocess.make_synthetic_dataset import ClipSpec, frame_caption
from runtime.files import atomic_write

MAX_WORDS = 16


def read_specs(data_json: str, split: str) -> list[ClipSpec]:
    """The clip specs of one split from the synthetic dataset's MSRVTT_data.json."""
    with open(data_json, encoding="utf-8") as f:
        videos = json.load(f)["videos"]
    specs = []
    for v in videos:
        if v["split"] == split:
            spec = dict(v["spec"])
            spec["background"] = tuple(spec["background"])
            specs.append(ClipSpec(**spec))
    return specs


def load_frames(specs: list[ClipSpec], videos_dir: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """Every frame of every clip as the model sees it (decoded, normalised; (N, 3, size, size)) and
    the caption of each frame."""
    images, captions = [], []
    for spec in specs:
        clip = load_video(os.path.join(videos_dir, spec.video_id + ".mp4"), spec.num_frames, size, train=False)
        if clip.info.num_frames != spec.num_frames:
            raise ValueError(f"{spec.video_id}.mp4 has {clip.info.num_frames} frames, its spec {spec.num_frames}")
        images.append(clip.video)
        captions += [frame_caption(spec, t) for t in range(spec.num_frames)]
    return torch.cat(images), captions


def _same_caption_targets(captions: list[str]) -> torch.Tensor:
    """(B, B) rows summing to one over the items that share a caption: a frame has as many right
    captions as there are frames with the same content in the batch, and none of them is a negative."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    k = torch.tensor([ids[c] for c in captions])
    same = (k[:, None] == k[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def pretrain_clip(clip: CLIP, tokenizer, images: torch.Tensor, captions: list[str], steps: int,
                  batch_size: int = 128, lr: float = 1e-3, seed: int = 0, log=None) -> list[float]:
    """Contrastive image-text training of every CLIP weight on (frame, caption) pairs; returns the
    loss of each step. Deterministic for a seed (and a thread count).

    Only the token-embedding rows the captions use take part: the training runs on a compact copy of
    those rows (the token ids keep their order, so the end-of-text token stays the largest id, where
    CLIP reads the caption's feature), written back at the end. Updating all 49408 rows of CLIP's
    vocabulary every step would cost more than the rest of the model."""
    full_ids = tokenize(captions, max_words=MAX_WORDS, tokenizer=tokenizer)
    used = torch.unique(full_ids)                       # sorted
    ids = torch.searchsorted(used, full_ids)
    full_embedding = clip.token_embedding
    clip.token_embedding = nn.Embedding.from_pretrained(full_embedding.weight[used].clone(), freeze=False)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    clip.train()
    losses = []
    order = torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(captions), generator=gen)])
        pick, order = order[:batch_size], order[batch_size:]
        batch_captions = [captions[i] for i in pick.tolist()]
        img = F.normalize(clip.encode_image(images[pick]), dim=-1)
        txt = F.normalize(clip.encode_text(ids[pick]), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.t()
        target = _same_caption_targets(batch_captions)
        loss = (torch.sum(-target * logits.log_softmax(1), 1).mean()
                + torch.sum(-target * logits.t().log_softmax(1), 1).mean()) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"pre-training step {step + 1}/{steps}: loss {loss.item():.3f}")
    with torch.no_grad():
        full_embedding.weight[used] = clip.token_embedding.weight
    clip.token_embedding = full_embedding
    clip.eval()
    return losses


@torch.no_grad()
def frame_caption_accuracy(clip: CLIP, tokenizer, images: torch.Tensor, captions: list[str]) -> float:
    """Share of frames whose own caption scores highest among all the distinct frame captions."""
    clip.eval()
    names = list(dict.fromkeys(captions))
    txt = F.normalize(clip.encode_text(tokenize(names, max_words=MAX_WORDS, tokenizer=tokenizer)), dim=-1)
    img = F.normalize(torch.cat([clip.encode_image(images[i:i + 512]) for i in range(0, len(images), 512)]), dim=-1)
    best = (img @ txt.t()).argmax(dim=1)
    truth = torch.tensor([names.index(c) for c in captions])
    return (best == truth).float().mean().item()


def save_clip(clip: CLIP, path: str) -> None:
    """OpenAI's state-dict layout (the names modules.clip.load_clip_state_dict reads), written atomically."""
    state = clip.state_dict()
    atomic_write(path, lambda f: torch.save(state, f))
