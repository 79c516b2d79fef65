"""CLIP backbone: dimensions from state dicts, weight loading, and the forward pass against a reference."""
from __future__ import annotations

import pickle

import pytest
import torch

from reference import published
from modules.clip import CLIP, CLIPConfig, build_clip, load_clip_state_dict, tiny_clip_config
from modules.dgl import DGL

VIT_B32 = CLIPConfig()
VIT_B16 = CLIPConfig(vision_patch_size=16)
VIT_L14 = CLIPConfig(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     transformer_width=768, transformer_heads=12, transformer_layers=12)


@pytest.mark.parametrize("config", [VIT_B32, VIT_B16, VIT_L14], ids=["ViT-B/32", "ViT-B/16", "ViT-L/14"])
def test_config_read_from_state_dict(config):
    with torch.device("meta"):
        state_dict = CLIP(config).state_dict()
    assert CLIPConfig.from_state_dict(state_dict) == config


def test_vit_b32_shapes():
    with torch.device("meta"):
        sd = CLIP(VIT_B32).state_dict()
    assert sd["visual.positional_embedding"].shape == (50, 768)  # 1 + 49 patches
    assert sd["visual.transformer.resblocks.11.attn.in_proj_weight"].shape == (2304, 768)
    assert sd["transformer.resblocks.0.mlp.c_fc.weight"].shape == (2048, 512)
    assert sd["text_projection"].shape == (512, 512)
    assert sum(v.numel() for v in sd.values()) == 151_277_313  # OpenAI ViT-B/32


def test_resnet_clip_is_rejected():
    with pytest.raises(ValueError, match="only ViT"):
        CLIPConfig.from_state_dict({"visual.layer1.0.conv1.weight": torch.zeros(1)})


def ref_block(block, x, mask=None):  # x (L, N, W), nn.MultiheadAttention semantics
    h = block.ln_1(x)
    x = x + published.mha(block, h, h, h, mask)
    return x + block.mlp(block.ln_2(x))


def test_towers_match_multihead_attention_reference(tiny_clip):
    images = torch.randn(3, 3, 32, 32)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1:9], ids[1, 9] = 49406, 5, 49407, 7, 49407
    v = tiny_clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(3, 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x).transpose(0, 1)
    for block in v.transformer.resblocks:
        x = ref_block(block, x)
    expected_image = v.ln_post(x[0]) @ v.proj
    t = (tiny_clip.token_embedding(ids) + tiny_clip.positional_embedding).transpose(0, 1)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    for block in tiny_clip.transformer.resblocks:
        t = ref_block(block, t, mask)
    t = tiny_clip.ln_final(t.transpose(0, 1))
    expected_text = t[torch.arange(2), ids.argmax(-1)] @ tiny_clip.text_projection
    with torch.no_grad():
        torch.testing.assert_close(tiny_clip.encode_image(images), expected_image, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tiny_clip.encode_text(ids), expected_text, rtol=1e-4, atol=1e-5)


class _ArchiveCLIP(CLIP):
    """Carries the integer attributes OpenAI's archives keep beside the weights."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("input_resolution", torch.tensor(config.image_resolution))
        self.register_buffer("context_length", torch.tensor(config.context_length))
        self.register_buffer("vocab_size", torch.tensor(config.vocab_size))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript: how OpenAI ships CLIP
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_load_torchscript_archive_fp16(tmp_path, tiny_clip):
    model = _ArchiveCLIP(tiny_clip_config())
    model.load_state_dict(tiny_clip.state_dict(), strict=False)
    traced = torch.jit.trace(model.eval(), (torch.randn(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)))
    traced = traced.half()  # OpenAI's archives hold fp16 weights
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    state_dict = load_clip_state_dict(path)
    assert "input_resolution" not in state_dict and "vocab_size" not in state_dict
    assert all(v.dtype == torch.float32 for v in state_dict.values() if v.is_floating_point())
    rebuilt = build_clip(state_dict)
    for name, p in tiny_clip.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], p.half().float(), msg=name)
    dgl = DGL.from_pretrained(path, max_words=12, max_frames=2, unified_transformer_layers=2)
    assert dgl.image_resolution == 32


def test_load_plain_state_dict_and_from_pretrained(tmp_path, tiny_clip):
    path = tmp_path / "clip.pt"
    torch.save(tiny_clip.state_dict(), path)
    model = DGL.from_pretrained(path, max_words=12, max_frames=2, unified_transformer_layers=2)
    for name, p in tiny_clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], p), name
    with pytest.raises(TypeError, match="unknown DGL option"):
        DGL.from_pretrained(path, max_word=12)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _ArchiveCLIP}, f)  # a class reference: refused by weights_only loading
    with pytest.raises(ValueError, match="evil.pt"):
        load_clip_state_dict(path)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt"):
        load_clip_state_dict(tmp_path / "ViT-B-32.pt")


def test_mismatched_state_dict(tiny_clip):
    sd = tiny_clip.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        build_clip(sd)
