"""Attention pictures: what DGL's global prompts look at in a video (and, with a caption, which
frames match it). Drawn with matplotlib (Agg backend, no display needed)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from modules.attention_maps import attention_maps
from retrieval.encode import frames_as_seen, read_for_model
from retrieval.model_io import SearchError
from runtime.errors import first_line


@torch.no_grad()
def caption_frame_similarity(model, tokenizer, caption: str, frame_features: torch.Tensor) -> np.ndarray:
    """Cosine similarity of the caption's text feature to each frame's CLS feature, (T,)."""
    from modules.tokenizer import tokenize

    device = next(model.parameters()).device
    ids = tokenize([caption], max_words=model.config.max_words, tokenizer=tokenizer).to(device)
    text = F.normalize(model.encode_text(ids).float(), dim=-1)                       # (1, D)
    return (F.normalize(frame_features.float(), dim=-1) @ text[0]).cpu().numpy()   # (T,)


def draw_attention(model, video_path: str, out_png: str, caption: str | None = None, tokenizer=None,
                   layer: int = -1, prompt: int | None = None) -> dict:
    """Write the picture; returns the numbers drawn (frames used, per-frame mass, similarities)."""
    if caption is not None and not caption.strip():
        raise SearchError("--caption is empty")
    if caption is not None and tokenizer is None:
        raise SearchError("a caption needs the tokenizer")
    try:
        video, mask, meta = read_for_model(os.path.abspath(video_path), model.config.max_frames,
                                           model.image_resolution)
    except Exception as err:  # noqa: BLE001
        raise SearchError(first_line(err)) from err
    device = next(model.parameters()).device
    maps = attention_maps(model, video[None].to(device), mask[None].to(device))
    if not -maps.num_layers <= layer < maps.num_layers:
        raise SearchError(f"--layer {layer}: the vision tower has {maps.num_layers} layers "
                          f"(0..{maps.num_layers - 1}, or negative from the end)")
    if prompt is not None and not 0 <= prompt < maps.num_global:
        raise SearchError(f"--prompt {prompt}: the model has {maps.num_global} global prompts (0..{maps.num_global - 1})")
    real = int(mask.sum())
    drawn = {
        "frames_used": meta["frames_used"],
        "fps": meta["fps"],
        "patch_attention": maps.patch_attention(layer, prompt)[0, :real].cpu().numpy(),   # (T, g, g)
        "frame_mass": maps.frame_mass(layer, prompt)[0].cpu().numpy(),                     # (T,) all frames
        "frames": frames_as_seen(video[:real]).numpy(),
        "layer": layer % maps.num_layers,
        "num_layers": maps.num_layers,
        "prompt": prompt,
        "num_prompts": maps.num_global,
    }
    if caption is not None:
        drawn["caption"] = caption
        drawn["similarity"] = caption_frame_similarity(model, tokenizer, caption, maps.frame_features[0, :real])
    _render(drawn, os.path.basename(video_path), out_png)
    return drawn


def _frame_label(index: int, fps: float) -> str:
    return f"frame {index}\n{index / fps:.1f} s" if fps else f"frame {index}"


def _render(d: dict, title: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import gridspec

    frames, heat = d["frames"], d["patch_attention"]
    T, size = frames.shape[0], frames.shape[1]
    labels = [_frame_label(i, d["fps"]) for i in d["frames_used"][:T]]
    rows = 4 if "similarity" in d else 3
    fig = plt.figure(figsize=(max(8.0, 1.9 * T + 1.6), 1.0 + 2.2 * rows), dpi=110)
    grid = gridspec.GridSpec(rows, T + 1, width_ratios=[1] * T + [0.08],
                             height_ratios=[1.25, 1.25] + [1] * (rows - 2), hspace=0.5, wspace=0.08, top=0.93)
    who = (f"the {d['num_prompts']} global prompts (their mean)" if d["prompt"] is None
           else f"global prompt {d['prompt']} of {d['num_prompts']}")
    fig.suptitle(f"{title}: attention of {who} over each frame's patches,\n"
                 f"vision layer {d['layer'] + 1} of {d['num_layers']}, mean over heads", fontsize=10, y=0.99)
    # Colour and opacity both grow with the weight: low-attention patches leave the frame visible.
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=float(heat.max()) or 1.0)
    cmap = matplotlib.colormaps["inferno"]
    for t in range(T):
        ax = fig.add_subplot(grid[0, t])
        ax.imshow(frames[t], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if t == 0:
            ax.set_ylabel("frames the\nmodel saw", fontsize=8)
        ax = fig.add_subplot(grid[1, t])
        ax.imshow(frames[t], interpolation="nearest")
        overlay = cmap(norm(heat[t]))
        overlay[..., 3] = 0.1 + 0.7 * norm(heat[t])
        ax.imshow(overlay, interpolation="nearest", extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(labels[t], fontsize=8)
        if t == 0:
            ax.set_ylabel("global prompts'\nattention", fontsize=8)
    cbar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=fig.add_subplot(grid[1, T]))
    cbar.set_label("attention weight\non each patch", fontsize=8)
    cbar.ax.tick_params(labelsize=7)

    ax = fig.add_subplot(grid[2, :T])
    mass = d["frame_mass"][:T]
    ax.bar(range(T), 100 * mass, color="#d1495b")
    for t, m in enumerate(mass):
        ax.text(t, 100 * m, f"{100 * m:.1f}%", ha="center", va="bottom", fontsize=8)
    rest = 100 * (1 - float(d["frame_mass"].sum()))
    padding = 100 * float(d["frame_mass"][T:].sum())
    note = f"; padding frames (the last frame repeated) take {padding:.1f}%" if len(d["frame_mass"]) > T else ""
    ax.set_title(f"share of the global prompts' attention on each frame (its CLS, prompts and patches); "
                 f"{rest:.1f}% stays on the global prompts{note}", fontsize=9)
    ax.set_ylabel("% of attention", fontsize=8)
    ax.set_xticks(range(T), [lab.replace("\n", ", ") for lab in labels], fontsize=7)
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(0, max(100 * float(mass.max()) * 1.25, 1.0))

    if "similarity" in d:
        ax = fig.add_subplot(grid[3, :T])
        sim = d["similarity"]
        ax.plot(range(T), sim, marker="o", color="#00798c")
        for t, s in enumerate(sim):
            ax.annotate(f"{s:.3f}", (t, s), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8)
        ax.set_title(f'cosine similarity of "{d["caption"]}" to each frame\'s CLS feature', fontsize=9)
        ax.set_ylabel("cosine", fontsize=8)
        ax.set_xticks(range(T), [lab.replace("\n", ", ") for lab in labels], fontsize=7)
        ax.set_xlim(-0.5, T - 0.5)
        pad = max(0.02, 0.15 * float(sim.max() - sim.min()))
        ax.set_ylim(float(sim.min()) - pad, float(sim.max()) + 2 * pad)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out_png)
