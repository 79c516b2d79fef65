"""DGL model: shapes, freezing, prompt independence, parity with a direct reference, checkpoints."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from reference import published
from modules.clip import CLIP, CLIPConfig, tiny_clip_config
from modules.dgl import DGL, DGLConfig, VISUAL_OUTPUT_TYPES, global_local_block

EOT = 49407


def make_ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, length, dtype=torch.long)
    for row in range(n):
        words = int(torch.randint(1, length - 1, (1,), generator=g))
        ids[row, 0] = EOT - 1
        ids[row, 1:1 + words] = torch.randint(1, 40000, (words,), generator=g)
        ids[row, 1 + words] = EOT
    return ids


def make_model(latent="linear", frames=3, words=12, layers=2, seed=0, clip_cfg=None, **kw) -> DGL:
    torch.manual_seed(seed)
    clip = CLIP(clip_cfg or tiny_clip_config()).eval()
    config = DGLConfig(shared_latent_space=latent, max_words=words, max_frames=frames,
                       unified_transformer_layers=layers, **kw)
    model = DGL(clip, config).eval()
    # Non-zero biases everywhere, so that a wrong slot or order cannot hide behind zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def video_batch(b=2, t=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 3, size, size, generator=g), torch.ones(b, t, dtype=torch.long)


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("latent,kind", list(itertools.product(["linear", "transformer"], VISUAL_OUTPUT_TYPES)))
def test_shapes_for_every_option(latent, kind):
    model = make_model(latent, visual_output_type=kind)
    ids = make_ids(5, 12)
    video, mask = video_batch(b=2)
    t, v = model.encode_text(ids), model.encode_video(video, mask)
    assert t.shape == (5, 64) and v.shape == (2, 64)
    assert model.similarity(t, v).shape == (5, 2)
    out = model(ids[:2], video, mask)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])


@pytest.mark.parametrize("latent,kind", list(itertools.product(["linear", "transformer"], VISUAL_OUTPUT_TYPES)))
def test_matches_direct_reference(latent, kind):
    model = make_model(latent, visual_output_type=kind)
    ids = make_ids(4, 12)
    video, mask = video_batch(b=2)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), published.encode_text(model, ids), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.encode_video(video, mask), published.encode_video(model, video),
                                   rtol=1e-4, atol=1e-5)


def test_fewer_prompted_layers_than_the_vision_tower():
    # Deep prompts in the first 2 of 3 vision layers; the third keeps its hidden prompt states.
    model = make_model("transformer", layers=2, clip_cfg=tiny_clip_config(vision_layers=3))
    video, mask = video_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(video, mask), published.encode_video(model, video),
                                   rtol=1e-4, atol=1e-5)


def test_global_local_block_equals_per_frame_loop():
    torch.manual_seed(3)
    block = CLIP(tiny_clip_config()).visual.transformer.resblocks[0]
    B, T, G, L, W = 3, 4, 2, 7, 128
    x = torch.randn(B, G + T * L, W)
    expected = []
    for b in range(B):
        glob, frames = x[b, :G], x[b, G:].view(T, L, W)
        h_glob, h_frames = block.ln_1(glob), block.ln_1(frames)
        out_frames = []
        for t in range(T):
            keys = torch.cat([h_glob, h_frames[t]])[:, None]
            out_frames.append(published.mha(block, h_frames[t][:, None], keys, keys)[:, 0])
        keys = torch.cat([h_glob, h_frames.reshape(T * L, W)])[:, None]
        out_glob = published.mha(block, h_glob[:, None], keys, keys)[:, 0]
        y = x[b] + torch.cat([out_glob, *out_frames])
        expected.append(y + block.mlp(block.ln_2(y)))
    with torch.no_grad():
        torch.testing.assert_close(global_local_block(block, x, G, T), torch.stack(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("latent", ["linear", "transformer"])
def test_only_prompts_train(latent):
    model = make_model(latent).train()
    ids = make_ids(2, 12)
    video, mask = video_batch()
    model(ids, video, mask)["loss"].backward()
    for name, p in model.clip.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    trainable = dict(model.trainable_parameters())
    assert set(trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in trainable.items():
        if name.startswith("prompt_generator.postfix_proj"):
            # Quirk kept: under the causal mask EOT never sees the postfix prompts.
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_postfix_prompts_do_not_change_text_features():
    model = make_model("linear")
    ids = make_ids(3, 12)
    before = model.encode_text(ids)
    with torch.no_grad():
        model.prompt_generator.postfix_proj.weight.normal_()
        model.prompt_generator.postfix_proj.bias.normal_()
    torch.testing.assert_close(model.encode_text(ids), before)


@pytest.mark.parametrize("latent", ["linear", "transformer"])
def test_features_do_not_depend_on_the_rest_of_the_batch(latent):
    model = make_model(latent)
    ids = make_ids(4, 12)
    video, mask = video_batch(b=3)
    with torch.no_grad():
        t_all, v_all = model.encode_text(ids), model.encode_video(video, mask)
        torch.testing.assert_close(model.encode_text(ids[2:3]), t_all[2:3], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_video(video[1:2], mask[1:2]), v_all[1:2], rtol=1e-5, atol=1e-6)
        p1, p2 = model.prompts(), model.prompts()
    assert torch.equal(p1.text, p2.text) and torch.equal(p1.frames, p2.frames)


def test_without_prompts_the_towers_are_plain_clip():
    model = make_model("transformer", text_prompt_length=0, local_each_frame_prompt_length=0,
                       global_visual_prompt_length=0, visual_output_type="average_frame_cls_token")
    ids = make_ids(3, 12)
    video, mask = video_batch(b=2, t=3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.clip.encode_text(ids), rtol=1e-4, atol=1e-5)
        frames = model.clip.encode_image(video.flatten(0, 1)).view(2, 3, -1).mean(1)
        torch.testing.assert_close(model.encode_video(video, mask), frames, rtol=1e-4, atol=1e-5)


def test_padding_frames_take_part_by_default():
    model = make_model("linear")
    video, mask = video_batch(b=1, t=3)
    padded = mask.clone()
    padded[:, 2] = 0
    changed = video.clone()
    changed[:, 2] = torch.randn_like(changed[:, 2])
    with torch.no_grad():
        base = model.encode_video(video, mask)
        # The published model ignores the mask ...
        torch.testing.assert_close(model.encode_video(video, padded), base)
        # ... so the content of a padding frame changes the feature.
        assert not torch.allclose(model.encode_video(changed, padded), base, atol=1e-4)


@pytest.mark.parametrize("kind", VISUAL_OUTPUT_TYPES)
def test_mask_padding_frames_option_ignores_padding_content(kind):
    model = make_model("linear", mask_padding_frames=True, visual_output_type=kind)
    video, mask = video_batch(b=2, t=3)
    mask[0, 1:] = 0
    changed = video.clone()
    changed[0, 1:] = torch.randn_like(changed[0, 1:])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(changed, mask), model.encode_video(video, mask),
                                   rtol=1e-5, atol=1e-6)
        # The real frames alone give the same feature as the padded video.
        torch.testing.assert_close(model.encode_video(video[:1, :1], mask[:1, :1]), model.encode_video(video, mask)[:1],
                                   rtol=1e-4, atol=1e-5)


def test_similarity_and_loss():
    model = make_model("linear")
    t, v = torch.randn(3, 64), torch.randn(2, 64)
    expected = (1 / 0.07) * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).t()  # exp(logit_scale) = 1/0.07
    torch.testing.assert_close(model.similarity(t, v), expected)
    sim = torch.tensor([[5.0, 1.0], [0.0, 3.0]])
    logp_rows = torch.log_softmax(sim, 1).diag()
    logp_cols = torch.log_softmax(sim, 0).diag()
    from modules.dgl import contrastive_loss
    torch.testing.assert_close(contrastive_loss(sim), -(logp_rows.mean() + logp_cols.mean()) / 2)


def test_transformer_latent_space_rejects_other_frame_counts():
    model = make_model("transformer", frames=3)
    video, mask = video_batch(b=1, t=4)
    with pytest.raises(ValueError, match="built for 3 frames"):
        model.encode_video(video, mask)


def test_bf16_autocast_close_to_fp32():
    model = make_model("linear")
    ids = make_ids(2, 12)
    video, mask = video_batch()
    with torch.no_grad():
        ref = model.similarity(model.encode_text(ids), model.encode_video(video, mask))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.similarity(model.encode_text(ids), model.encode_video(video, mask))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.3)


@pytest.mark.parametrize("bad,match", [
    (dict(shared_latent_space="mlp"), "shared_latent_space"),
    (dict(visual_output_type="mean"), "visual_output_type"),
    (dict(text_prompt_length=7), "even"),
    (dict(shared_latent_space="linear", text_prompt_length=6, local_each_frame_prompt_length=4),
     "2 \\* local_each_frame_prompt_length"),
    (dict(global_visual_prompt_length=0), "global prompts"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        DGLConfig(**bad)


def test_too_many_prompted_layers():
    with pytest.raises(ValueError, match="exceeds the CLIP depth"):
        make_model(layers=3)


# --------------------------------------------------------------------------- trainable counts

def vit_b32_on_meta(latent: str) -> DGL:
    with torch.device("meta"):
        return DGL(CLIP(CLIPConfig()), DGLConfig(shared_latent_space=latent))


def test_trainable_count_linear_vit_b32():
    assert vit_b32_on_meta("linear").num_trainable_parameters() == 827_392


def test_trainable_count_transformer_vit_b32():
    # table 56 x 9216 + one 768-wide block + MLP 768->1536->512 + 4 global prompts.
    assert vit_b32_on_meta("transformer").num_trainable_parameters() == 9_575_168


# --------------------------------------------------------------------------- checkpoints

LINEAR_OFFICIAL = {"clip.visual.prompt_embeddings", "clip.visual_prompt_embedding",
                   "clip.prefix_text_prompt_proj_layer.weight", "clip.prefix_text_prompt_proj_layer.bias",
                   "clip.postfix_text_prompt_proj_layer.weight", "clip.postfix_text_prompt_proj_layer.bias"}
TRANSFORMER_OFFICIAL = {"clip.visual.prompt_embeddings", "clip.unified_prompt_embedding.weight",
                        "clip.unified_prompt_mlp.c_fc.weight", "clip.unified_prompt_mlp.c_fc.bias",
                        "clip.unified_prompt_mlp.c_proj.weight", "clip.unified_prompt_mlp.c_proj.bias"} | {
    f"clip.PromptTransformer.resblocks.0.{n}" for n in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
        "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
        "ln_2.weight", "ln_2.bias")}


@pytest.mark.parametrize("latent,names", [("linear", LINEAR_OFFICIAL), ("transformer", TRANSFORMER_OFFICIAL)])
def test_state_dict_uses_official_layout(latent, names):
    model = make_model(latent)
    keys = set(model.state_dict())
    clip_keys = {"clip." + k for k in model.clip.state_dict()}
    assert keys == clip_keys | names | {"clip.visual.position_ids"}
    assert model.state_dict()["clip.visual.prompt_embeddings"].shape == (1, 4, 128)
    if latent == "linear":
        assert model.state_dict()["clip.visual_prompt_embedding"].shape == (1, 4, 2 * 128)
    else:
        assert model.state_dict()["clip.unified_prompt_embedding.weight"].shape == (8 + 4 * 3, 2 * 128)


@pytest.mark.parametrize("latent", ["linear", "transformer"])
@pytest.mark.parametrize("ddp_prefix", ["", "module."])
def test_official_checkpoint_round_trip(tmp_path, latent, ddp_prefix):
    trained = make_model(latent, seed=1)
    with torch.no_grad():
        for _, p in trained.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "ckpt.best.pth.tar"
    state = {ddp_prefix + k: v.half() if k.startswith("clip.visual.transformer") else v
             for k, v in trained.state_dict().items()}  # backbone stored in fp16, as CLIP ships
    torch.save({"epoch": 3, "global_step": 30, "arch": "DGL", "best_acc1": 44.7, "optimizer": {},
                "state_dict": state}, path)
    fresh = make_model(latent, seed=2)
    info = fresh.load_checkpoint(path)
    assert info["epoch"] == 3
    for (name, p), (_, q) in zip(fresh.trainable_parameters(), trained.trainable_parameters()):
        assert torch.equal(p, q), name
    ids = make_ids(2, 12)
    video, mask = video_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_text(ids), trained.encode_text(ids))
        torch.testing.assert_close(fresh.encode_video(video, mask), trained.encode_video(video, mask),
                                   rtol=1e-2, atol=1e-2)  # fp16-stored backbone


def test_checkpoint_with_prompts_only_keeps_the_backbone(tmp_path):
    trained, fresh = make_model(seed=1), make_model(seed=1)
    prompts_only = {k: v for k, v in trained.state_dict().items() if k in LINEAR_OFFICIAL}
    with torch.no_grad():
        trained.global_prompts.mul_(2)
    prompts_only["clip.visual.prompt_embeddings"] = trained.global_prompts.detach().clone()
    fresh.load_checkpoint({"state_dict": prompts_only})
    assert torch.equal(fresh.global_prompts, trained.global_prompts)
    with pytest.raises(ValueError, match="CLIP weights missing"):
        fresh.load_checkpoint({"state_dict": prompts_only}, strict_backbone=True)


def test_checkpoint_errors(tmp_path):
    linear, transformer = make_model("linear"), make_model("transformer")
    with pytest.raises(ValueError, match="prompt parameters missing"):
        linear.load_checkpoint({"state_dict": transformer.state_dict()})
    other_frames = make_model("transformer", frames=4)
    with pytest.raises(ValueError, match="shapes do not match"):
        transformer.load_checkpoint({"state_dict": other_frames.state_dict()})
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        linear.load_checkpoint(tmp_path / "nothing.pth")
