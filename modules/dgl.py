"""DGL: Dynamic Global-Local prompt tuning of a frozen CLIP for text-video retrieval.

Read top to bottom:
  1. DGLConfig: the published flags (its own module, dgl_config.py, so the command lines need no torch).
  2. Prompt generators (the "shared latent space"): parameters only, no input, so every caption and
     every video gets the same prompts and video features never depend on the text.
  3. global_local_block: one vision block with DGL's attention pattern, for all frames at once.
  4. DGL: prompted text tower, prompted video tower, similarity, loss, official checkpoint layout.

Notation (shape comments): B videos, N captions, T frames, S patches per frame, P local prompts per
frame, G global prompts, K text prompts (K/2 prefix + K/2 postfix), Ly prompted layers, Wv / Wt
vision / text widths, D the joint embedding width, H heads.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import fields
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backends import same_attention_backends
from .checkpoints import strip_module_prefix
from .clip import CLIP, QuickGELU, ResidualAttentionBlock, build_clip, feed_forward, load_clip_state_dict
from .dgl_config import LATENT_SPACES, VISUAL_OUTPUT_TYPES, DGLConfig  # noqa: F401 (here for the model's users)
from .order import order_column_bias, order_contrastive_loss, reorder_frames


class Prompts(NamedTuple):
    text: torch.Tensor    # (Ly, K, Wt): rows :K/2 prefix, K/2: postfix
    frames: torch.Tensor  # (Ly, 1 or T, P, Wv): per frame, or one set shared by every frame


def _prompt_init_bound(patch_size: int, width: int) -> float:
    # Xavier-uniform bound of the published code: sqrt(6 / (3 * patch * patch + width)).
    return math.sqrt(6.0 / (3 * patch_size * patch_size + width))


class LinearPromptGenerator(nn.Module):
    """P learned vectors per layer shared by every frame; text prompts are two linear maps of them."""

    def __init__(self, config: DGLConfig, vision_width: int, text_width: int, patch_size: int):
        super().__init__()
        self.layers, self.length, self.width = (config.unified_transformer_layers,
                                                config.local_each_frame_prompt_length, vision_width)
        # (1, P, Ly * Wv): the official layout; row p holds layer l's vector at [l*Wv:(l+1)*Wv].
        self.frame_prompts = nn.Parameter(torch.empty(1, self.length, self.layers * vision_width))
        bound = _prompt_init_bound(patch_size, vision_width)
        nn.init.uniform_(self.frame_prompts, -bound, bound)
        self.prefix_proj = nn.Linear(vision_width, text_width)
        self.postfix_proj = nn.Linear(vision_width, text_width)

    def forward(self) -> Prompts:
        v = self.frame_prompts.view(self.length, self.layers, self.width).transpose(0, 1)  # (Ly, P, Wv)
        text = torch.cat([self.prefix_proj(v), self.postfix_proj(v)], dim=1)              # (Ly, 2P, Wt)
        return Prompts(text=text, frames=v.unsqueeze(1))                                  # (Ly, 1, P, Wv)


class TransformerPromptGenerator(nn.Module):
    """A learned table of K + P*T tokens per layer, mixed by one transformer block; the first K outputs
    are mapped to the text width (text prompts), the other P*T are the frame prompts (frame-major)."""

    def __init__(self, config: DGLConfig, vision_width: int, text_width: int):
        super().__init__()
        self.layers, self.width = config.unified_transformer_layers, vision_width
        self.text_length = config.text_prompt_length
        self.frames, self.frame_length = config.max_frames, config.local_each_frame_prompt_length
        rows = self.text_length + self.frames * self.frame_length
        # (K + P*T, Ly * Wv), initialised like nn.Embedding (the published code's type).
        self.embedding = nn.Parameter(torch.randn(rows, self.layers * vision_width))
        self.block = ResidualAttentionBlock(vision_width, vision_width // 64)
        self.text_mlp = nn.Sequential()
        self.text_mlp.add_module("c_fc", nn.Linear(vision_width, vision_width * 2))
        self.text_mlp.add_module("gelu", QuickGELU())
        self.text_mlp.add_module("c_proj", nn.Linear(vision_width * 2, text_width))

    def forward(self) -> Prompts:
        rows = self.embedding.shape[0]
        x = self.embedding.view(rows, self.layers, self.width).transpose(0, 1)  # (Ly, K + P*T, Wv)
        x = self.block(x)  # each layer's tokens form one sequence; no mask
        text = self.text_mlp(x[:, : self.text_length])                          # (Ly, K, Wt)
        frames = x[:, self.text_length:].reshape(self.layers, self.frames, self.frame_length, self.width)
        return Prompts(text=text, frames=frames)                                # (Ly, T, P, Wv)


def global_local_block(block: ResidualAttentionBlock, x: torch.Tensor, num_global: int, num_frames: int,
                       key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One vision block with DGL's global-local attention, for every frame at once.

    x: (B, G + T*L, W), the G global tokens then each frame's L = 1 + P + S tokens (frame-major).
    Frame tokens attend to the video's global tokens and their own frame; global tokens attend to the
    global tokens and every frame token. Both use the block's own attention weights.
    key_padding_mask: optional (B, G + T*L) bool, False for tokens the global queries must ignore.
    """
    attn = block.attn
    B, length, W = x.shape
    G, T = num_global, num_frames
    L = (length - G) // T
    H, d = attn.heads, W // attn.heads

    q, k, v = attn.qkv(block.ln_1(x))  # (B, H, G + T*L, d) each

    # Global queries over the whole video.
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out_global = (F.scaled_dot_product_attention(q[:, :, :G], k, v, attn_mask=mask) if G
                  else q[:, :, :0])  # (B, H, G, d)

    # Local queries: each frame over [global tokens, its own tokens]; frames join the batch.
    def per_frame(t: torch.Tensor) -> torch.Tensor:  # (B, H, G + T*L, d) -> (B, T, H, L, d), a view
        return t[:, :, G:].unflatten(2, (T, L)).transpose(1, 2)

    def with_globals(t: torch.Tensor) -> torch.Tensor:  # -> (B*T, H, G + L, d)
        # one concatenation of the strided views: each value is copied once (a reshape of each part
        # first would copy it twice)
        glob = t[:, :, :G].unsqueeze(1).expand(B, T, H, G, d)
        return torch.cat([glob, per_frame(t)], dim=3).view(B * T, H, G + L, d)

    out_local = F.scaled_dot_product_attention(per_frame(q).reshape(B * T, H, L, d), with_globals(k),
                                               with_globals(v))
    out_local = out_local.view(B, T, H, L, d)

    # Back to tokens: (B, G + T*L, W).
    out = torch.cat([out_global.transpose(1, 2), out_local.permute(0, 1, 3, 2, 4).reshape(B, T * L, H, d)],
                    dim=1).reshape(B, length, W)
    x = x + attn.out_proj(out)
    return x + feed_forward(block.mlp, block.ln_2(x))


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0, keeping the autograd graph.

    The backward pass sums each process's gradient for its slice over processes; after DDP averages
    the parameter gradients, R processes with batch b match one process with batch R*b.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(sim: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of a square similarity matrix whose diagonal holds the positives."""
    target = torch.arange(sim.shape[0], device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


# Internal parameter name prefix -> official DGL checkpoint name prefix. Longest prefixes first.
_OFFICIAL_NAMES = {
    "linear": [
        ("global_prompts", "clip.visual.prompt_embeddings"),
        ("prompt_generator.frame_prompts", "clip.visual_prompt_embedding"),
        ("prompt_generator.prefix_proj.", "clip.prefix_text_prompt_proj_layer."),
        ("prompt_generator.postfix_proj.", "clip.postfix_text_prompt_proj_layer."),
        ("clip.", "clip."),
    ],
    "transformer": [
        ("global_prompts", "clip.visual.prompt_embeddings"),
        ("prompt_generator.embedding", "clip.unified_prompt_embedding.weight"),
        ("prompt_generator.block.", "clip.PromptTransformer.resblocks.0."),
        ("prompt_generator.text_mlp.", "clip.unified_prompt_mlp."),
        ("clip.", "clip."),
    ],
}
# A buffer the published vision tower registers; written for compatibility, ignored when read.
_POSITION_IDS = "clip.visual.position_ids"


def _rename(key: str, rules: list[tuple[str, str]], reverse: bool = False) -> str | None:
    for ours, theirs in rules:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


class DGL(nn.Module):
    """A frozen CLIP with DGL's prompts and global-local video attention; only the prompts train."""

    def __init__(self, clip: CLIP, config: DGLConfig | None = None):
        super().__init__()
        config = config or DGLConfig()
        cc = clip.config
        layers = config.unified_transformer_layers
        if layers > cc.transformer_layers or layers > cc.vision_layers:
            raise ValueError(f"unified_transformer_layers={layers} exceeds the CLIP depth "
                             f"({cc.vision_layers} vision / {cc.transformer_layers} text layers)")
        if config.max_words + config.text_prompt_length > 512:
            raise ValueError("max_words + text_prompt_length is unreasonably long")
        if config.max_words > cc.context_length:
            raise ValueError(f"max_words={config.max_words} exceeds CLIP's {cc.context_length} positions")
        self.config = config
        self.clip = clip
        self.clip.requires_grad_(False)  # frozen backbone, logit_scale included
        if config.shared_latent_space == "linear":
            self.prompt_generator = LinearPromptGenerator(config, cc.vision_width, cc.transformer_width,
                                                          cc.vision_patch_size)
        else:
            self.prompt_generator = TransformerPromptGenerator(config, cc.vision_width, cc.transformer_width)
        bound = _prompt_init_bound(cc.vision_patch_size, cc.vision_width)
        self.global_prompts = nn.Parameter(torch.empty(1, config.global_visual_prompt_length, cc.vision_width))
        nn.init.uniform_(self.global_prompts, -bound, bound)
        self._official_names = _OFFICIAL_NAMES[config.shared_latent_space]
        self.grad_checkpointing = False  # see set_grad_checkpointing
        self.register_state_dict_post_hook(DGL._to_official_layout)
        self.register_load_state_dict_pre_hook(DGL._from_official_layout)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, clip_weights: str | os.PathLike | dict, **config) -> "DGL":
        """DGL on top of CLIP weights: a TorchScript archive, a saved state dict, or a state dict."""
        known = {f.name for f in fields(DGLConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TypeError(f"unknown DGL option(s) {unknown}; known: {sorted(known)}")
        state_dict = clip_weights if isinstance(clip_weights, dict) else load_clip_state_dict(clip_weights)
        return cls(build_clip(state_dict), DGLConfig(**config))

    @property
    def image_resolution(self) -> int:
        return self.clip.config.image_resolution

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The prompt parameters (everything DGL adds to CLIP), by their internal names."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("clip.")]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters() if p.requires_grad)

    def prompts(self) -> Prompts:
        return self.prompt_generator()

    def set_grad_checkpointing(self, enabled: bool = True) -> "DGL":
        """Keep only each vision block's input for the backward pass and recompute the rest there: the
        video tower's activation memory drops to one tensor per block, for about one more forward pass
        of compute. The results are the same."""
        self.grad_checkpointing = bool(enabled)
        return self

    # ----------------------------------------------------------------------------- text
    def encode_text(self, ids: torch.Tensor, prompts: Prompts | None = None, trim: bool = False) -> torch.Tensor:
        """ids (N, max_words) in the dataloader convention -> text features (N, D).

        ``trim``: leave out what no feature depends on (the same features to float rounding, fewer
        positions: 14 instead of 40 for a 10-token text). Under the causal mask a position's output
        depends only on the positions up to it, and every row's EOT comes at or before the batch's last
        EOT, so the id columns after that one (padding) and the postfix prompts, which follow it, are
        dropped before the prompts are inserted.
        """
        if trim:
            ids = ids[:, : int(ids.argmax(dim=-1).max()) + 1]
        prompts = prompts or self.prompts()
        clip, K = self.clip, self.config.text_prompt_length
        half = K // 2
        postfix = 0 if trim else K - half
        N, L = ids.shape
        text_prompts = prompts.text.to(clip.dtype)                         # (Ly, K, Wt)

        def with_prompts(x: torch.Tensor, layer: int) -> torch.Tensor:
            # [SOT], K/2 prefix, tokens 1..L-1, K/2 postfix (none when trimmed): (N, L + half + postfix, Wt).
            # Prompts get no positions.
            p = text_prompts[layer].expand(N, K, -1)
            return torch.cat([x[:, :1], p[:, :half], x[:, 1:L], p[:, half:half + postfix]], dim=1)

        x = clip.token_embedding(ids) + clip.positional_embedding[:L].to(clip.dtype)  # (N, L, Wt)
        x = with_prompts(x, 0)
        for layer, block in enumerate(clip.transformer.resblocks[: self.config.unified_transformer_layers]):
            if layer > 0:  # overwrite the prompt slots with this layer's prompts
                x = with_prompts(torch.cat([x[:, :1], x[:, 1 + half: half + L]], dim=1), layer)
            # Causal: EOT never sees the postfix prompts after it (a published quirk, kept).
            x = block(x, causal=True)
        x = clip.ln_final(x)
        eot = ids.argmax(dim=-1) + half  # the EOT token sits K/2 later than in the plain sequence
        return x[torch.arange(N, device=x.device), eot] @ clip.text_projection

    # ----------------------------------------------------------------------------- video
    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor | None = None,
                     prompts: Prompts | None = None, block_fn=None) -> torch.Tensor:
        """video (B, T, 3, H, W) normalised pixels, video_mask (B, T) -> video features (B, D).

        The published model ignores video_mask (padding frames take part); so does this one unless
        config.mask_padding_frames is set. ``block_fn`` replaces :func:`global_local_block` (same
        signature); modules/attention_maps.py passes an explicit-attention block that records weights.
        """
        prompts = prompts or self.prompts()
        visual, cfg = self.clip.visual, self.config
        B, T = video.shape[:2]
        P, G = cfg.local_each_frame_prompt_length, cfg.global_visual_prompt_length
        if prompts.frames.shape[1] not in (1, T):
            raise ValueError(f"this transformer-latent DGL was built for {prompts.frames.shape[1]} frames "
                             f"(max_frames); got videos of {T}")
        frame_prompts = prompts.frames.to(self.clip.dtype)                              # (Ly, 1|T, P, Wv)

        frames = visual.embed(video.flatten(0, 1).to(self.clip.dtype))                  # (B*T, 1+S, Wv)
        frames = frames.view(B, T, frames.shape[1], frames.shape[2])                    # (B, T, 1+S, Wv)
        W = frames.shape[-1]
        L = 1 + P + frames.shape[2] - 1

        def with_prompts(f: torch.Tensor, layer: int) -> torch.Tensor:
            # Each frame: [CLS], P local prompts, patches -> (B, T, L, Wv)
            p = frame_prompts[layer].expand(B, T, P, W)
            return torch.cat([f[:, :, :1], p, f[:, :, -(L - 1 - P):]], dim=2)

        x = torch.cat([self.global_prompts.to(frames.dtype).expand(B, G, W),
                       with_prompts(frames, 0).flatten(1, 2)], dim=1)                   # (B, G + T*L, Wv)

        key_mask = None
        if cfg.mask_padding_frames and video_mask is not None:
            frame_ok = video_mask.bool().repeat_interleave(L, dim=1)                    # (B, T*L)
            key_mask = torch.cat([frame_ok.new_ones(B, G), frame_ok], dim=1)

        for layer, block in enumerate(visual.transformer.resblocks):
            if 0 < layer < cfg.unified_transformer_layers:  # overwrite each frame's local prompt slots
                f = x[:, G:].view(B, T, L, W)
                x = torch.cat([x[:, :G], with_prompts(f, layer).flatten(1, 2)], dim=1)
            step = block_fn or global_local_block
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(step, block, x, G, T, key_mask, use_reentrant=False,
                               context_fn=same_attention_backends)
            else:
                x = step(block, x, G, T, key_mask)

        return self._pool_video(x, B, T, L, video_mask)

    def _pool_video(self, x: torch.Tensor, B: int, T: int, L: int, video_mask: torch.Tensor | None) -> torch.Tensor:
        """ln_post + proj of the tokens the visual_output_type reads, then their mean."""
        visual, cfg = self.clip.visual, self.config
        G = cfg.global_visual_prompt_length
        kind = cfg.visual_output_type

        def project(t: torch.Tensor) -> torch.Tensor:
            return visual.ln_post(t) @ visual.proj

        if kind == "global_prompt0":
            return project(x[:, 0])
        if kind == "average_global_prompt":
            return project(x[:, :G]).mean(dim=1)
        cls_tokens = project(x[:, G:].view(B, T, L, -1)[:, :, 0])                       # (B, T, D)
        if cfg.mask_padding_frames and video_mask is not None:
            weights = video_mask.to(cls_tokens.dtype).unsqueeze(-1)                      # (B, T, 1)
        else:
            weights = torch.ones_like(cls_tokens[..., :1])
        if kind == "average_frame_cls_token":
            return (cls_tokens * weights).sum(1) / weights.sum(1).clamp_min(1)
        glob = project(x[:, :G])                                                        # (B, G, D)
        return (glob.sum(1) + (cls_tokens * weights).sum(1)) / (G + weights.sum(1))

    # ----------------------------------------------------------------------------- retrieval
    def similarity(self, text_features: torch.Tensor, video_features: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cosine similarity, (N, B), computed in fp32."""
        with torch.autocast(device_type=text_features.device.type, enabled=False):
            t = F.normalize(text_features.float(), dim=-1)
            v = F.normalize(video_features.float(), dim=-1)
            return self.clip.logit_scale.exp().float() * t @ v.t()

    def forward(self, ids: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor,
                frame_order: torch.Tensor | None = None, order_weight: float = 1.0) -> dict:
        """Training step: symmetric InfoNCE over the batch gathered from every process.

        ``frame_order`` (n, T), optional: order negatives (modules/order.py): each video is encoded again
        with its frames in this order, and every caption scores those copies as extra text-to-video
        negatives, their logits raised by log(order_weight). None: the published loss.
        """
        prompts = self.prompts()
        text = self.encode_text(ids, prompts)
        if frame_order is None:
            vid = self.encode_video(video, video_mask, prompts)
            sim = self.similarity(gather_with_grad(text), gather_with_grad(vid))
            return {"loss": contrastive_loss(sim), "sim": sim, "text_features": text, "video_features": vid}
        n = video.shape[0]
        both = self.encode_video(torch.cat([video, reorder_frames(video, frame_order)]),
                                 torch.cat([video_mask, video_mask]), prompts)
        vid, reordered = both[:n], both[n:]
        all_text = gather_with_grad(text)
        sim = self.similarity(all_text, gather_with_grad(vid))
        order_sim = self.similarity(all_text, gather_with_grad(reordered))
        bias = gather_with_grad(order_column_bias(frame_order, order_weight))
        return {"loss": order_contrastive_loss(sim, order_sim, bias), "sim": sim, "order_sim": order_sim,
                "text_features": text, "video_features": vid, "reordered_video_features": reordered}

    # ----------------------------------------------------------------------------- checkpoints
    @staticmethod
    def _to_official_layout(module: "DGL", state_dict: dict, prefix: str, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            official = _rename(key[len(prefix):], module._official_names)
            if official is not None:
                state_dict[prefix + official] = state_dict.pop(key)
        num_positions = module.clip.visual.positional_embedding.shape[0]
        state_dict[prefix + _POSITION_IDS] = torch.arange(num_positions).unsqueeze(0)

    @staticmethod
    def _from_official_layout(module: "DGL", state_dict: dict, prefix: str, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        state_dict.pop(prefix + _POSITION_IDS, None)
        internal = {n for n, _ in module.named_parameters()}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            if name in internal:
                continue
            ours = _rename(name, module._official_names, reverse=True)
            if ours is not None:
                state_dict[prefix + ours] = state_dict.pop(key)

    def load_checkpoint(self, checkpoint: str | os.PathLike | dict, strict_backbone: bool = False) -> dict:
        """Load an official DGL checkpoint or one of ours (same layout), keys with or without 'module.'.

        Every prompt parameter must be present. CLIP weights in the checkpoint replace the current
        ones; when the checkpoint has none (or only some) the current ones stay, unless
        ``strict_backbone``. Returns the checkpoint dict (epoch, optimizer, ... when present).
        """
        source = checkpoint if isinstance(checkpoint, dict) else str(checkpoint)
        if not isinstance(checkpoint, dict):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"checkpoint not found: {source}")
            checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        name = source if isinstance(source, str) else "checkpoint"
        state_dict = checkpoint.get("state_dict", checkpoint)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{name}: no state dict found")
        state_dict = strip_module_prefix(state_dict)
        own = self.state_dict()
        mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in state_dict.items() if k in own and k != _POSITION_IDS and v.shape != own[k].shape]
        if mismatched:
            raise ValueError(f"{name}: shapes do not match this model's configuration "
                             f"({self.config.shared_latent_space} latent space, {self.config.max_frames} frames): "
                             + "; ".join(mismatched[:5]))
        # Official names of the prompt parameters: those that are not CLIP's once renamed back.
        prompt_keys = {k for k in own if not _rename(k, self._official_names, reverse=True).startswith("clip.")}
        missing_prompts = sorted(prompt_keys - set(state_dict))
        if missing_prompts:
            raise ValueError(f"{name}: prompt parameters missing: {missing_prompts} (is it a "
                             f"{self.config.shared_latent_space}-latent-space DGL checkpoint?)")
        state_dict = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v
                      for k, v in state_dict.items()}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        if strict_backbone and missing:
            raise ValueError(f"{name}: CLIP weights missing: {missing[:8]}")
        if unexpected:
            warnings.warn(f"{name}: ignored {len(unexpected)} unexpected keys, e.g. {unexpected[:4]}")
        return checkpoint
