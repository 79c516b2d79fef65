"""DGL's forward pass written the way the published code computes it.

Sequence-first (L, N, D) tensors, frames laid out token-major, nn.functional multi-head attention
with separate query and key/value projections, a Python loop over frames filling a zero-initialised
key buffer, prompts expanded per batch element, and the global-local block split into a frame
attention and a prompt attention. It reads the weights of a ``modules.dgl.DGL`` and shares none of
its code, so the tests hold the model against it and the benchmark times it as the baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mha(block, q, k, v, mask=None):
    a = block.attn
    return F.multi_head_attention_forward(
        q, k, v, a.width, a.heads, a.in_proj_weight, a.in_proj_bias, None, None, False, 0.0,
        a.out_proj.weight, a.out_proj.bias, training=False, need_weights=False, attn_mask=mask)[0]


def make_prompts(model, batch):
    cfg, layers = model.config, model.config.unified_transformer_layers
    gen = model.prompt_generator
    if cfg.shared_latent_space == "linear":
        width = model.clip.config.vision_width
        v = gen.frame_prompts.expand(batch, -1, -1)
        v = v.view(batch, cfg.local_each_frame_prompt_length, layers, width).permute(2, 0, 1, 3)
        text = torch.cat((gen.prefix_proj(v), gen.postfix_proj(v)), dim=2)
        return text, v                                                      # (Ly, B, K, Wt), (Ly, B, P, Wv)
    length, width = gen.embedding.shape[0], gen.width
    e = gen.embedding.unsqueeze(0).expand(batch, -1, -1).reshape(batch, length, layers, width)
    e = e.permute(2, 0, 1, 3).reshape(layers * batch, length, width).permute(1, 0, 2)
    blk = gen.block
    h = blk.ln_1(e)
    e = e + mha(blk, h, h, h)
    e = e + blk.mlp(blk.ln_2(e))
    out = e.permute(1, 0, 2).reshape(layers, batch, length, width)
    return gen.text_mlp(out[:, :, :cfg.text_prompt_length]), out[:, :, cfg.text_prompt_length:]


def encode_text(model, text):
    clip, cfg = model.clip, model.config
    K, half, L = cfg.text_prompt_length, cfg.text_prompt_length // 2, text.shape[1]
    prompts, _ = make_prompts(model, text.shape[0])
    x = clip.token_embedding(text) + clip.positional_embedding[:L]
    x = torch.cat((x[:, 0:1], prompts[0][:, :half], x[:, 1:L], prompts[0][:, half:]), dim=1)
    position = torch.zeros(text.shape[0], L + K, device=text.device)
    position[:, 0:1] = text[:, 0:1]
    position[:, half + 1: half + L] = text[:, 1:L]
    x = x.permute(1, 0, 2)
    mask = torch.full((L + K, L + K), float("-inf"), device=text.device).triu_(1)
    for i in range(cfg.unified_transformer_layers):
        if i > 0:
            p = prompts[i].permute(1, 0, 2)
            x = torch.cat((x[:1], p[:half], x[half + 1: half + L], p[half:]), dim=0)
        blk = clip.transformer.resblocks[i]
        h = blk.ln_1(x)
        x = x + mha(blk, h, h, h, mask)
        x = x + blk.mlp(blk.ln_2(x))
    hidden = clip.ln_final(x.permute(1, 0, 2)) @ clip.text_projection
    return hidden[torch.arange(hidden.shape[0]), position.argmax(dim=-1)]


def encode_video(model, video):
    clip, cfg = model.clip, model.config
    vis = clip.visual
    B, T = video.shape[:2]
    G, P, W = cfg.global_visual_prompt_length, cfg.local_each_frame_prompt_length, vis.width
    _, frame_prompts = make_prompts(model, B)

    def frame_prompt(i):  # (B, T, P, W)
        if cfg.shared_latent_space == "transformer":
            return frame_prompts[i].reshape(B, T, P, W)
        return frame_prompts[i].view(B, P, W).unsqueeze(1).expand(-1, T, -1, -1)

    x = vis.conv1(video.reshape(-1, *video.shape[2:]))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([vis.class_embedding + torch.zeros(x.shape[0], 1, W, device=x.device), x], dim=1) + vis.positional_embedding
    x = vis.ln_pre(x).view(B, T, x.shape[-2], W)
    x = torch.cat((x[:, :, 0:1], frame_prompt(0), x[:, :, 1:]), dim=2).permute(0, 2, 1, 3).reshape(B, -1, W)
    x = torch.cat((model.global_prompts.expand(B, -1, -1), x), dim=1).permute(1, 0, 2)  # (G + L*T, B, W)
    BT = B * T
    for i, blk in enumerate(vis.transformer.resblocks):
        if 0 < i < cfg.unified_transformer_layers:
            glob = x[:G]
            local = x[G:].reshape(-1, T, B, W)
            local = torch.cat((local[:1], frame_prompt(i).permute(2, 1, 0, 3), local[1 + P:]), dim=0)
            x = torch.cat((glob, local.reshape(-1, B, W)), dim=0)
        prompt_tokens, frame_tokens = blk.ln_1(x[:G]), blk.ln_1(x[G:].reshape(-1, BT, W))
        key1 = torch.zeros(G + frame_tokens.shape[0], BT, W, device=x.device)
        for j in range(0, BT, B):
            key1[:, j:j + B] = torch.cat((prompt_tokens, frame_tokens[:, j:j + B]), dim=0)
        out_frames = mha(blk, frame_tokens, key1, key1).reshape(-1, B, W)
        key2 = torch.cat((prompt_tokens, frame_tokens.reshape(-1, B, W)), dim=0)
        out_prompts = mha(blk, prompt_tokens, key2, key2)
        x = x + torch.cat((out_prompts, out_frames), dim=0)
        x = x + blk.mlp(blk.ln_2(x))
    hidden = vis.ln_post(x.permute(1, 0, 2)) @ vis.proj
    cls = hidden[:, G:].reshape(B, -1, T, hidden.shape[-1])[:, 0]
    kind = cfg.visual_output_type
    if kind == "global_prompt0":
        return hidden[:, 0]
    if kind == "average_global_prompt":
        return hidden[:, :G].mean(1)
    if kind == "average_frame_cls_token":
        return cls.mean(1)
    return torch.cat((hidden[:, :G], cls), dim=1).mean(1)
