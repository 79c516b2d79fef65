"""What DGL's global prompts attend to: an explicit-attention path used only for pictures.

The model's own video path (``DGL.encode_video`` with :func:`modules.dgl.global_local_block`) runs
fused attention and never materialises attention weights, so training and evaluation pay nothing
for this module. :func:`attention_maps` runs the same forward with an explicit softmax over one
dense, masked attention per block (the global-local pattern written as a mask) and records the
global prompts' attention weights in every layer. Its output features equal ``encode_video``'s
(a test checks it to 1e-5), so the weights shown are the ones that made the features.

Notation as in modules/dgl.py: B videos, T frames, G global prompts, P local prompts per frame,
S patches per frame, L = 1 + P + S tokens per frame, H heads, N = G + T*L tokens per video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .clip import ResidualAttentionBlock


def global_local_mask(num_global: int, num_frames: int, frame_length: int, device=None) -> torch.Tensor:
    """(N, N) bool, True where query i may attend to key j: global tokens attend to every token;
    frame tokens attend to the global tokens and to their own frame."""
    frame_of = torch.cat([torch.full((num_global,), -1, device=device),
                          torch.arange(num_frames, device=device).repeat_interleave(frame_length)])
    is_global = frame_of < 0
    return is_global[:, None] | is_global[None, :] | (frame_of[:, None] == frame_of[None, :])


class _RecordingBlock:
    """A drop-in for ``global_local_block`` (same signature) computing attention explicitly.

    Keeps, for every block it runs, the global queries' weights averaged over heads (B, G, N), and the
    tokens the last block returned.
    """

    def __init__(self):
        self.global_weights: list[torch.Tensor] = []
        self.last_tokens: torch.Tensor | None = None

    def __call__(self, block: ResidualAttentionBlock, x: torch.Tensor, num_global: int, num_frames: int,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = block.attn
        B, N, W = x.shape
        G = num_global
        q, k, v = attn.qkv(block.ln_1(x))                                   # (B, H, N, d) each
        allowed = global_local_mask(G, num_frames, (N - G) // num_frames, x.device)  # (N, N)
        allowed = allowed.expand(B, 1, N, N)
        if key_padding_mask is not None:  # applies to the global queries only, as in the fused block
            rows_global = torch.arange(N, device=x.device)[:, None] < G     # (N, 1)
            allowed = allowed & (~rows_global | key_padding_mask[:, None, None, :])
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, N, N)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out = (weights.to(v.dtype) @ v)                                      # (B, H, N, d)
        self.global_weights.append(weights[:, :, :G].mean(dim=1).detach())  # (B, G, N)
        x = x + attn.out_proj(attn.merge_heads(out))
        x = x + block.mlp(block.ln_2(x))
        self.last_tokens = x.detach()
        return x


@dataclass
class AttentionMaps:
    """Everything a picture needs, for a batch of B videos.

    features:       (B, D) the video features (equal to ``model.encode_video``'s)
    global_weights: (layers, B, G, N) float32, the global prompts' attention over all N tokens of the
                    video, mean over heads; tokens ordered [G global, frame 0 (CLS, P prompts, S
                    patches), frame 1, ...]
    frame_features: (B, T, D) each frame's CLS token after the last block, through ln_post and proj
                    (the frame features DGL averages for the "frame CLS" output types)
    """

    features: torch.Tensor
    global_weights: torch.Tensor
    frame_features: torch.Tensor
    num_global: int
    num_frames: int
    num_prompts: int
    grid: int

    @property
    def num_layers(self) -> int:
        return self.global_weights.shape[0]

    def _weights(self, layer: int, prompt: int | None) -> torch.Tensor:
        """(B, N) attention of one global prompt, or the mean over them, in ``layer``."""
        w = self.global_weights[layer]                                      # (B, G, N)
        return w.mean(dim=1) if prompt is None else w[:, prompt]

    def _per_frame(self, w: torch.Tensor) -> torch.Tensor:
        G, T = self.num_global, self.num_frames
        return w[:, G:].reshape(w.shape[0], T, -1)                         # (B, T, L)

    def patch_attention(self, layer: int = -1, prompt: int | None = None) -> torch.Tensor:
        """(B, T, grid, grid): the attention each frame's patches receive from the global prompts."""
        frames = self._per_frame(self._weights(layer, prompt))
        patches = frames[:, :, 1 + self.num_prompts:]                       # (B, T, S)
        return patches.reshape(*patches.shape[:2], self.grid, self.grid)

    def frame_mass(self, layer: int = -1, prompt: int | None = None) -> torch.Tensor:
        """(B, T): the share of the global prompts' attention on each frame's tokens (CLS, local
        prompts and patches); the rest, ``1 - sum``, goes to the global prompts themselves."""
        return self._per_frame(self._weights(layer, prompt)).sum(dim=-1)


@torch.no_grad()
def attention_maps(model, video: torch.Tensor, video_mask: torch.Tensor | None = None) -> AttentionMaps:
    """Run ``model`` (a DGL) on ``video`` (B, T, 3, H, W) with explicit attention; see AttentionMaps."""
    recorder = _RecordingBlock()
    features = model.encode_video(video, video_mask, block_fn=recorder)
    cfg, visual = model.config, model.clip.visual
    B, T = video.shape[:2]
    G, P = cfg.global_visual_prompt_length, cfg.local_each_frame_prompt_length
    tokens = recorder.last_tokens                                           # (B, N, Wv)
    cls_tokens = tokens[:, G:].reshape(B, T, -1, tokens.shape[-1])[:, :, 0]  # (B, T, Wv)
    frame_features = visual.ln_post(cls_tokens) @ visual.proj               # (B, T, D)
    grid = model.clip.config.image_resolution // model.clip.config.vision_patch_size
    return AttentionMaps(features=features, global_weights=torch.stack(recorder.global_weights).float(),
                         frame_features=frame_features, num_global=G, num_frames=T, num_prompts=P, grid=grid)
