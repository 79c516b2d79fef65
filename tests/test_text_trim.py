"""The text branch trimmed to the positions its features depend on (DGL.encode_text(trim=True)): the same
features as the full 40-position sequence, on fewer positions; the search path uses it."""
from __future__ import annotations

import pytest
import torch

from modules.clip import CLIP, tiny_clip_config
from modules.dgl import DGL, DGLConfig
from modules.tokenizer import get_tokenizer
from retrieval.index import VideoIndex

EOT = 49407


def random_dgl(words: int, prompts: int, layers: int, latent: str = "linear", seed: int = 0) -> DGL:
    torch.manual_seed(seed)
    clip = CLIP(tiny_clip_config(transformer_layers=3)).eval()
    model = DGL(clip, DGLConfig(shared_latent_space=latent, max_words=words, max_frames=2,
                                text_prompt_length=prompts, local_each_frame_prompt_length=prompts // 2,
                                unified_transformer_layers=layers)).eval()
    with torch.no_grad():  # non-zero biases: a position that leaks in cannot hide behind zeros
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def ids_of_lengths(lengths: list[int], words: int, seed: int = 1) -> torch.Tensor:
    """Rows [SOT] + n random tokens + [EOT], zero padded to ``words`` (n = words - 2: a full-length caption)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), words, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = EOT - 1
        ids[row, 1:1 + n] = torch.randint(1, 40000, (n,), generator=g)
        ids[row, 1 + n] = EOT
    return ids


def positions_seen(model: DGL, run, every: bool = False):
    """The sequence length the first text block receives while ``run()`` encodes (``every``: of each call,
    as (rows, positions))."""
    seen = []
    hook = model.clip.transformer.resblocks[0].register_forward_pre_hook(
        lambda _m, args: seen.append(tuple(args[0].shape[:2])))
    try:
        run()
    finally:
        hook.remove()
    return seen if every else seen[0][1]


@pytest.mark.parametrize("prompts,layers,latent", [(8, 2, "linear"), (4, 2, "transformer"), (0, 1, "linear")])
def test_trimmed_text_features_equal_the_full_sequence(prompts, layers, latent):
    words = 32
    model = random_dgl(words, prompts, layers, latent)
    with torch.no_grad():
        p = model.prompts()
        # Mixed lengths, a full-length caption (30 tokens: its EOT in the last column), short ones alone.
        for lengths in ([3, 30, 7, 1, 12], [1, 2, 5], [4], [30], [2, 29]):
            ids = ids_of_lengths(lengths, words, seed=len(lengths))
            full = model.encode_text(ids, p)
            trimmed = model.encode_text(ids, p, trim=True)
            assert full.abs().max() > 0.1
            torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5, msg=lambda m: f"{lengths}: {m}")
            # [SOT] + the longest row's tokens and EOT + the prefix prompts; padding and postfix left out.
            assert positions_seen(model, lambda: model.encode_text(ids, p, trim=True)) == max(lengths) + 2 + prompts // 2
            assert positions_seen(model, lambda: model.encode_text(ids, p)) == words + prompts
        # Each row alone (its own, shorter trim) is the same feature too.
        alone = torch.cat([model.encode_text(ids[i:i + 1], p, trim=True) for i in range(len(ids))])
        torch.testing.assert_close(alone, model.encode_text(ids, p), rtol=1e-5, atol=1e-5)


def test_search_path_encodes_trimmed_texts(bpe_path):
    model = random_dgl(32, 8, 2)
    tokenizer = get_tokenizer(bpe_path=bpe_path)
    index = VideoIndex(None, {}, [], model=model, tokenizer=tokenizer)
    texts = ["a dog", "a person plays the guitar in a small kitchen"]
    from modules.tokenizer import tokenize

    ids = tokenize(texts, max_words=32, tokenizer=tokenizer)
    seen = positions_seen(model, lambda: index.encode_texts(texts))
    assert seen == int(ids.argmax(dim=-1).max()) + 1 + 4 < 40
    with torch.no_grad():
        full = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
    torch.testing.assert_close(index.encode_texts(texts), full, rtol=1e-5, atol=1e-5)


def test_many_texts_are_encoded_in_batches_of_similar_length(bpe_path, monkeypatch):
    import retrieval.index as index_module

    model = random_dgl(32, 8, 2)
    tokenizer = get_tokenizer(bpe_path=bpe_path)
    index = VideoIndex(None, {}, [], model=model, tokenizer=tokenizer)
    words = "a person plays the guitar in a small kitchen while a dog sleeps near the door of the house".split()
    texts = [" ".join(words[:n]) for n in (12, 1, 7, 3, 18, 2, 9)]  # lengths out of order
    from modules.tokenizer import tokenize

    ids = tokenize(texts, max_words=32, tokenizer=tokenizer)
    with torch.no_grad():
        full = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
    monkeypatch.setattr(index_module, "TEXT_BATCH", 3)
    calls = positions_seen(model, lambda: index.encode_texts(texts), every=True)
    eots = sorted(int(e) for e in ids.argmax(dim=-1))
    assert calls == [(len(eots[lo:lo + 3]), eots[lo:lo + 3][-1] + 1 + 4) for lo in range(0, len(texts), 3)]
    torch.testing.assert_close(index.encode_texts(texts), full, rtol=1e-5, atol=1e-5)
