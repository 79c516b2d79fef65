"""CLIP BPE tokenizer on CLIP's real vocabulary and on the real captions of the shared annotations."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from modules.tokenizer import (SimpleTokenizer, clean_text, find_bpe_path, get_tokenizer, tokenize,
                               write_bpe_vocab)

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tok(bpe_path) -> SimpleTokenizer:
    return get_tokenizer(bpe_path)


def test_vocabulary_layout(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT)


@pytest.mark.parametrize("text,ids", [
    # Ids printed by OpenAI's clip.tokenize for its README example and two more captions.
    ("a diagram", [320, 22697]),
    ("a dog", [320, 1929]),
    ("a cat", [320, 2368]),
])
def test_known_clip_ids(tok, text, ids):
    assert tok.encode(text) == ids


def test_dataloader_convention(bpe_path, tok):
    ids = tokenize(["a dog", "a cat runs " * 20, ""], max_words=8, bpe_path=bpe_path)
    assert ids.dtype == torch.int64 and ids.shape == (3, 8)
    assert ids[0].tolist() == [SOT, 320, 1929, EOT, 0, 0, 0, 0]
    long_ids = tok.encode("a cat runs " * 20)
    assert ids[1].tolist() == [SOT, *long_ids[:6], EOT]  # cut to max_words - 2
    assert ids[2].tolist() == [SOT, EOT, 0, 0, 0, 0, 0, 0]  # empty caption
    assert tokenize("a dog", max_words=8, tokenizer=tok).tolist() == ids[:1].tolist()


def test_cleaning_html_unicode_and_whitespace(tok):
    assert clean_text("  Tom &amp;amp; Jerry\n\tRUN ") == "tom & jerry run"
    assert tok.encode("Tom &amp; Jerry") == tok.encode("tom & jerry")
    assert tok.encode("caf\u00c3\u00a9") == tok.encode("café")  # mojibake repaired by ftfy
    for text in ["café naïve", "日本語のキャプション", "emoji 😀 in text", "a 3-year-old's\u00a0toy"]:
        ids = tok.encode(text)
        assert all(0 <= i < 49406 for i in ids)
        assert tok.decode(ids).replace(" ", "") == clean_text(text).replace(" ", "")


def _real_captions(annotations_dir) -> list[str]:
    captions = []
    with open(annotations_dir / "msrvtt" / "MSRVTT_JSFUSION_test.csv", newline="") as f:
        captions += [row["sentence"] for row in csv.DictReader(f)]
    with open(annotations_dir / "lsmdc" / "LSMDC16_challenge_1000_publictect.csv", newline="") as f:
        captions += [row[-1] for row in csv.reader(f, delimiter="\t")]
    val = json.loads((annotations_dir / "activitynet" / "val_1.json").read_text())
    captions += [" ".join(entry["sentences"]) for entry in list(val.values())[:300]]
    return captions


def test_real_captions(annotations_dir, bpe_path, tok):
    captions = _real_captions(annotations_dir)
    assert len(captions) == 2300
    ids = tokenize(captions, max_words=32, bpe_path=bpe_path)
    assert (ids[:, 0] == SOT).all()
    eot_count = (ids == EOT).sum(1)
    assert (eot_count == 1).all()
    eot_pos = ids.argmax(1)  # EOT is the largest id: the text tower finds it this way
    assert (ids[torch.arange(len(ids)), eot_pos] == EOT).all()
    for row, caption in zip(ids, captions):
        full = tok.encode(caption)
        n = int(row.argmax())
        assert row[1:n].tolist() == full[:30]
        assert (row[n + 1:] == 0).all()
        # Byte-level BPE loses nothing but whitespace.
        assert tok.decode(full).replace(" ", "") == clean_text(caption).replace(" ", "")
    # Over-long ActivityNet paragraphs are cut at max_words.
    assert (ids[-300:, -1] == EOT).sum() > 100


def test_find_bpe_path_order(tmp_path, monkeypatch, bpe_path):
    monkeypatch.delenv("DGL_BPE_PATH", raising=False)
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "bpe_simple_vocab_16e6.txt.gz").write_bytes(b"x")
    assert find_bpe_path(bpe_path, pretrained) == bpe_path
    assert find_bpe_path(None, pretrained) == str(pretrained / "bpe_simple_vocab_16e6.txt.gz")
    monkeypatch.setenv("DGL_BPE_PATH", bpe_path)
    assert find_bpe_path(None, tmp_path) == bpe_path


def test_missing_vocabulary_message(tmp_path, monkeypatch):
    monkeypatch.delenv("DGL_BPE_PATH", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        find_bpe_path(tmp_path / "nope.txt.gz", tmp_path)
    message = str(err.value)
    assert "nope.txt.gz" in message and "DGL_BPE_PATH" in message and "OpenAI CLIP" in message


def test_own_small_vocabulary(tmp_path):
    texts = ["a red square moves left then up", "a blue circle moves right then down"] * 5
    path = write_bpe_vocab(texts, tmp_path / "small.txt.gz", num_merges=20)
    small = SimpleTokenizer(path)
    assert small.vocab_size == 512 + 20 + 2
    assert small.eot_token_id == small.vocab_size - 1
    ids = small.encode("a red circle moves up")
    assert max(ids) < small.sot_token_id
    assert small.decode(ids) == "a red circle moves up"
    assert len(ids) < len("a red circle moves up".replace(" ", ""))  # merges were learned and used
