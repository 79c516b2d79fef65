"""The Python API exactly as the README documents it, on a tiny CLIP saved as a weights file."""
from __future__ import annotations

import torch

from modules import DGL, tokenize
from modules.clip import CLIP, tiny_clip_config


def test_readme_api(tmp_path, bpe_path):
    torch.manual_seed(0)
    clip_path = tmp_path / "ViT-B-32.pt"
    torch.save(CLIP(tiny_clip_config()).state_dict(), clip_path)

    model = DGL.from_pretrained(str(clip_path), shared_latent_space="linear", max_words=32, max_frames=12,
                                text_prompt_length=8, local_each_frame_prompt_length=4,
                                global_visual_prompt_length=4, unified_transformer_layers=2,
                                visual_output_type="global_prompt0")
    assert model.num_trainable_parameters() > 0

    # A checkpoint in the official layout, with DDP's 'module.' prefix.
    with torch.no_grad():
        model.global_prompts.add_(1.0)
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "ckpt.best.pth.tar")
    reloaded = DGL.from_pretrained(str(clip_path), shared_latent_space="linear", max_words=32, max_frames=12,
                                   unified_transformer_layers=2)
    reloaded.load_checkpoint(str(tmp_path / "ckpt.best.pth.tar"))
    assert torch.equal(reloaded.global_prompts, model.global_prompts)

    ids = tokenize(["a man is cooking", "a dog runs on the beach"], max_words=32, bpe_path=bpe_path)
    assert ids.shape == (2, 32) and ids.dtype == torch.int64
    video = torch.randn(3, 12, 3, 32, 32)
    video_mask = torch.ones(3, 12, dtype=torch.long)
    reloaded.eval()
    with torch.no_grad():
        t = reloaded.encode_text(ids)
        v = reloaded.encode_video(video, video_mask)
        s = reloaded.similarity(t, v)
    assert t.shape == (2, 64) and v.shape == (3, 64) and s.shape == (2, 3)
    assert float(s.abs().max()) <= 1 / 0.07 + 1e-4  # exp(logit_scale) * cosine

    reloaded.train()
    out = reloaded(ids, video[:2], video_mask[:2])
    loss = out["loss"] if isinstance(out, dict) else out
    loss.backward()
    assert reloaded.global_prompts.grad is not None
