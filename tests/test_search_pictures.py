"""The explicit attention path (pictures only) against the fused model path; the PNG; the HTML page,
also rendered by a real headless browser (slow, skipped without Chromium)."""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.attention_maps import attention_maps, global_local_mask
from modules.dgl import VISUAL_OUTPUT_TYPES
from retrieval.cli import main
from tests.test_dgl import make_model, video_batch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------------------------ attention path
# Every output type and both padding rules; the transformer latent space skips the frame-CLS-only type
# (the attention path does not depend on the latent space, which only makes the prompts).
@pytest.mark.parametrize("latent,kind,mask_padding", [
    (latent, kind, mask) for latent, kind, mask in itertools.product(["linear", "transformer"], VISUAL_OUTPUT_TYPES,
                                                                     [False, True])
    if not (kind.startswith("average_frame") and latent == "transformer")])
def test_explicit_attention_path_equals_fused_path(latent, kind, mask_padding):
    model = make_model(latent, frames=3, visual_output_type=kind, mask_padding_frames=mask_padding)
    video, mask = video_batch(b=2, t=3)
    mask[1, 2] = 0  # a padding frame, so that the masked variant differs
    with torch.no_grad():
        fused = model.encode_video(video, mask)
    maps = attention_maps(model, video, mask)
    torch.testing.assert_close(maps.features, fused, atol=1e-5, rtol=1e-5)
    G, T = model.config.global_visual_prompt_length, 3
    layers = model.clip.config.vision_layers
    assert maps.global_weights.shape[:3] == (layers, 2, G)
    # Each global query's weights are a distribution over the video's tokens.
    torch.testing.assert_close(maps.global_weights.sum(-1), torch.ones(layers, 2, G))
    mass = maps.frame_mass()
    assert mass.shape == (2, T) and bool((mass[mask.bool()] > 0).all()) and bool((mass.sum(1) < 1).all())
    if mask_padding:  # the padding frame gets no attention from the global prompts
        assert float(mass[1, 2]) == 0.0
    grid = model.clip.config.image_resolution // model.clip.config.vision_patch_size
    assert maps.patch_attention(layer=0, prompt=1).shape == (2, T, grid, grid)


def test_frame_features_are_the_models_frame_cls_features():
    model = make_model("linear", frames=3, visual_output_type="average_frame_cls_token")
    video, mask = video_batch(b=2, t=3)
    maps = attention_maps(model, video, mask)
    # average_frame_cls_token is the mean of exactly these frame features
    torch.testing.assert_close(maps.frame_features.mean(1), maps.features, atol=1e-5, rtol=1e-5)


def test_global_local_mask_pattern():
    m = global_local_mask(num_global=2, num_frames=2, frame_length=3)
    assert m.shape == (8, 8)
    assert bool(m[:2].all()) and bool(m[:, :2].all())               # globals see all, all see globals
    assert bool(m[2:5, 2:5].all()) and not bool(m[2:5, 5:].any())   # a frame sees itself only


def _dense_reference_block(block, x, num_global, num_frames, key_padding_mask=None):
    """DGL's vision block written the plain way: one attention over all tokens with a dense mask (frame tokens
    see the global tokens and their own frame; global tokens see every token not masked as padding)."""
    B, n, W = x.shape
    G, T = num_global, num_frames
    frame = torch.cat([torch.full((G,), -1), torch.arange(T).repeat_interleave((n - G) // T)])
    allowed = (frame[:, None] == frame[None, :]) | (frame[None, :] == -1) | (frame[:, None] == -1)
    allowed = allowed.expand(B, n, n).clone()
    if key_padding_mask is not None:
        allowed[:, :G] &= key_padding_mask[:, None, :]
    bias = torch.zeros(B, n, n).masked_fill(~allowed, float("-inf"))
    a = block.attn
    h = block.ln_1(x).transpose(0, 1)  # (n, B, W)
    out, _ = F.multi_head_attention_forward(
        h, h, h, W, a.heads, a.in_proj_weight, a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight,
        a.out_proj.bias, need_weights=False, attn_mask=bias.repeat_interleave(a.heads, dim=0))
    x = x + out.transpose(0, 1)
    return x + block.mlp(block.ln_2(x))


@pytest.mark.parametrize("mask_padding", [False, True])
def test_fused_path_unchanged_by_default(mask_padding):
    """encode_video's default path (the fused global_local_block) computes DGL's global-local attention: the
    same features as the plain dense-mask attention written independently here."""
    model = make_model("transformer", frames=3, mask_padding_frames=mask_padding)
    video, mask = video_batch(b=2, t=3)
    mask[1, 2] = 0
    with torch.no_grad():
        default = model.encode_video(video, mask)
        reference = model.encode_video(video, mask, block_fn=_dense_reference_block)
    torch.testing.assert_close(default, reference, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ picture
def test_visualize_png(world, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "pic.png"
    video = os.path.join(world.videos, "video0.mp4")
    code = main(["visualize", video, "--out", str(out), "--caption", "a red square moves left then up",
                 *world.model_args()])
    assert code == 0 and out.is_file()
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 400 and img.shape[1] > 600
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # frames, colour scale, bars, text
    # The numbers drawn are the model's.
    from retrieval.pictures import draw_attention
    loaded = world.model()
    drawn = draw_attention(loaded.model, video, str(tmp_path / "pic2.png"), caption="a red square",
                           tokenizer=loaded.tokenizer, layer=0, prompt=1)
    assert drawn["layer"] == 0 and drawn["frames"].shape[0] == len(drawn["frames_used"])
    assert drawn["similarity"].shape == (len(drawn["frames_used"]),)
    assert np.all(drawn["frame_mass"] > 0) and drawn["frame_mass"].sum() < 1
    from retrieval import SearchError
    for kwargs, needle in [({"layer": 7}, "--layer 7"), ({"prompt": 5}, "--prompt 5"),
                           ({"caption": " "}, "--caption is empty")]:
        with pytest.raises(SearchError, match=needle):
            draw_attention(loaded.model, video, str(tmp_path / "x.png"), tokenizer=loaded.tokenizer, **kwargs)
    with pytest.raises(SystemExit):
        main(["visualize", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "x.png"), *world.model_args()])
    err = capsys.readouterr().err
    assert "file not found" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ results page
def build_page(world, tmp_path, capsys, k=3):
    idx = str(tmp_path / "idx")
    assert main(["index", world.videos, "--index", idx, *world.model_args(), "--workers", "0", "--no_progress",
                 "--precision", "fp32"]) == 0
    page = tmp_path / "results.html"
    assert main(["query", "a red square moves left then up", "the green circle", "--index", idx, "-k", str(k),
                 "--html", str(page), "--device", "cpu"]) == 0
    capsys.readouterr()
    return page


def test_results_page_content(world, tmp_path, capsys):
    page = build_page(world, tmp_path, capsys)
    text = page.read_text()
    assert text.count('<li class="result">') == 6
    assert text.count("data:image/png;base64,") == 6            # one frame strip per result, embedded
    assert "a red square moves left then up" in text and "file://" in text
    assert "http" not in text.replace("file://", "")               # self-contained
    scores = [float(s) for s in re.findall(r"score (-?[0-9.]+)", text)]
    assert len(scores) == 6 and scores[:3] == sorted(scores[:3], reverse=True)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_results_page_in_headless_chromium(world, tmp_path, capsys):
    from PIL import Image

    page = build_page(world, tmp_path, capsys, k=4)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1400"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="result"') == 8
    assert len(re.findall(r'<img class="strip" src="data:image/png;base64,', dom.stdout)) == 8
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1400, 1100)
    # Non-trivial rendering: many colours (the frame strips) and rows of text, not a blank page.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    assert float((img.mean(axis=2) < 128).mean()) > 0.02
