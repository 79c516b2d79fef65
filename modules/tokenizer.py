"""CLIP's byte-level BPE tokenizer and the DGL dataloader convention for token ids.

The vocabulary is CLIP's merges file (``bpe_simple_vocab_16e6.txt.gz``).  It is not shipped with the
project; :func:`find_bpe_path` looks for it and says where to get it when it is missing.

Ids are CLIP's: 256 byte symbols, the same 256 with an end-of-word marker, one id per merge, then
``<|startoftext|>`` and ``<|endoftext|>``.  The end-of-text id is the largest id, which the text tower
relies on to find the EOT position with ``argmax``.
"""
from __future__ import annotations

import collections
import functools
import gzip
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    import torch

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_ENV_VAR = "DGL_BPE_PATH"
SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
# CLIP reads at most this many merges: 49152 - 256 - 2 of them give a 49408-token vocabulary.
MAX_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"

_MISSING_BPE_HELP = (
    "CLIP's BPE vocabulary '{name}' was not found (looked in: {looked}). "
    "Get it from the OpenAI CLIP repository (clip/bpe_simple_vocab_16e6.txt.gz) and pass its path with "
    "--bpe_path / tokenize(bpe_path=...), put it in --pretrained_dir, or set {env}."
)


def find_bpe_path(bpe_path: str | os.PathLike | None = None,
                  pretrained_dir: str | os.PathLike | None = None) -> str:
    """Locate the BPE file: an explicit path, then ``pretrained_dir``, then ``$DGL_BPE_PATH``."""
    looked = []
    if bpe_path is not None:
        if Path(bpe_path).is_file():
            return str(bpe_path)
        looked.append(str(bpe_path))
    if pretrained_dir is not None:
        candidate = Path(pretrained_dir) / BPE_FILENAME
        if candidate.is_file():
            return str(candidate)
        looked.append(str(candidate))
    env = os.environ.get(BPE_ENV_VAR)
    if env:
        if Path(env).is_file():
            return env
        looked.append(f"${BPE_ENV_VAR}={env}")
    else:
        looked.append(f"${BPE_ENV_VAR} (unset)")
    raise FileNotFoundError(_MISSING_BPE_HELP.format(name=BPE_FILENAME, looked=", ".join(looked), env=BPE_ENV_VAR))


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) are moved to
    code points from 256 upwards so that no BPE symbol is whitespace or a control character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _split_pattern():
    import regex  # the \p{L}/\p{N} classes need the third-party regex module

    return regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )


def clean_text(text: str) -> str:
    """CLIP's normalisation: fix mojibake, unescape HTML (twice), collapse whitespace, lower-case."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def pre_tokenize(text: str) -> list[str]:
    """Cleaned text split into words, each written with the byte-to-unicode alphabet."""
    table = byte_to_unicode()
    return ["".join(table[b] for b in word.encode("utf-8")) for word in _split_pattern().findall(clean_text(text))]


def _pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


class SimpleTokenizer:
    """Byte-level BPE with CLIP's vocabulary layout (ids identical to CLIP's tokenizer)."""

    def __init__(self, bpe_path: str | os.PathLike):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The first line is a version header; merges follow one per line as "left right".
        merge_lines = [line for line in lines[1:MAX_MERGES + 1] if line.strip()]
        merges = []
        for number, line in enumerate(merge_lines, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{bpe_path}: line {number} is not a BPE merge 'left right': {line!r}")
            merges.append((parts[0], parts[1]))
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT_TEXT, EOT_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.byte_decoder = {c: b for b, c in byte_to_unicode().items()}
        self.cache = {SOT_TEXT: SOT_TEXT, EOT_TEXT: EOT_TEXT}
        self.sot_token_id = self.encoder[SOT_TEXT]
        self.eot_token_id = self.encoder[EOT_TEXT]
        self.vocab_size = len(vocab)
        self.path = str(bpe_path)

    def bpe(self, token: str) -> str:
        """Apply the merges to one pre-tokenised word; returns the symbols joined by spaces."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + END_OF_WORD,)
        while len(word) > 1:
            best = min(_pairs(word), key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            left, right = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == left and word[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        return [self.encoder[piece] for word in pre_tokenize(text) for piece in self.bpe(word).split(" ")]

    def decode(self, ids: Iterable[int]) -> str:
        """Text for the ids (lower-cased and whitespace-normalised, as encoding left it)."""
        words = "".join(self.decoder[int(i)] for i in ids).split(END_OF_WORD)
        text = [bytearray(self.byte_decoder[c] for c in w).decode("utf-8", errors="replace")
                if not any(s in w for s in (SOT_TEXT, EOT_TEXT)) else w for w in words]
        return " ".join(w for w in text if w).strip()


@functools.lru_cache(maxsize=8)
def _tokenizer_for(path: str) -> SimpleTokenizer:
    return SimpleTokenizer(path)


def get_tokenizer(bpe_path: str | os.PathLike | None = None,
                  pretrained_dir: str | os.PathLike | None = None) -> SimpleTokenizer:
    """A tokenizer for the located BPE file, built once per path."""
    return _tokenizer_for(os.path.abspath(find_bpe_path(bpe_path, pretrained_dir)))


MIN_WORDS = 2  # [SOT] and [EOT]: the published tokenizer keeps both, so two positions are the least


def token_ids(tokenizer: SimpleTokenizer, text: str, max_words: int) -> list[int]:
    """[SOT] + BPE ids cut to ``max_words - 2`` + [EOT], not padded."""
    if max_words < MIN_WORDS:
        raise ValueError(f"max_words must be at least {MIN_WORDS} (room for SOT and EOT), got {max_words}")
    return [tokenizer.sot_token_id, *tokenizer.encode(text)[: max_words - 2], tokenizer.eot_token_id]


def text_as_read(tokenizer: SimpleTokenizer, text: str, max_words: int) -> tuple[int, ...]:
    """What the text tower reads of ``text``, for telling two texts apart: the BPE ids after CLIP's cleaning
    (ftfy, HTML, whitespace, lower case), cut where :func:`token_ids` cuts them, without the ids of words
    that are punctuation only ("A man." and "a man" read the same). Two texts with the same key get the
    same features, or nearly: only their punctuation differs."""
    ids: list[int] = []
    budget, used = max(0, max_words - 2), 0
    table = byte_to_unicode()
    for word in _split_pattern().findall(clean_text(text)):
        if used >= budget:
            break
        pieces = tokenizer.bpe("".join(table[b] for b in word.encode("utf-8"))).split(" ")[:budget - used]
        used += len(pieces)  # punctuation takes its place in the cut but is not compared
        if any(ch.isalnum() for ch in word):
            ids.extend(tokenizer.encoder[p] for p in pieces)
    return tuple(ids)


def tokenize(texts: str | Sequence[str], max_words: int = 32, bpe_path: str | os.PathLike | None = None,
             pretrained_dir: str | os.PathLike | None = None,
             tokenizer: SimpleTokenizer | None = None) -> torch.Tensor:
    """Token ids in the DGL dataloader convention: ``(N, max_words)`` int64, zero padded."""
    import torch  # here, not above: DGLConfig reads MIN_WORDS, and the command lines read DGLConfig without torch

    if isinstance(texts, str):
        texts = [texts]
    tokenizer = tokenizer or get_tokenizer(bpe_path, pretrained_dir)
    out = torch.zeros(len(texts), max_words, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = token_ids(tokenizer, text, max_words)
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def learn_bpe_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges (most frequent adjacent pair first) from a corpus, in CLIP's symbol alphabet."""
    words = collections.Counter(w for text in texts for w in pre_tokenize(text))
    # Each distinct word as a list of symbols, its last symbol carrying the end-of-word marker.
    corpus = [(list(w[:-1]) + [w[-1] + END_OF_WORD], n) for w, n in words.items() if w]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        counts: collections.Counter = collections.Counter()
        for symbols, n in corpus:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] += n
        if not counts:
            break
        # Ties broken by the pair itself, so the result does not depend on dict order.
        best = max(counts.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        for symbols, _n in corpus:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i:i + 2] = [best[0] + best[1]]
                else:
                    i += 1
    return merges


def write_bpe_vocab(texts: Iterable[str], path: str | os.PathLike, num_merges: int = 2000) -> str:
    """Write a small BPE merges file in CLIP's format (gzip text, version header, one merge a line).

    ``SimpleTokenizer`` reads it like CLIP's own file; its vocabulary has ``512 + merges + 2`` ids.
    """
    merges = learn_bpe_merges(texts, num_merges)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("".join(f"{a} {b}\n" for a, b in merges))
    os.replace(tmp, path)
    return str(path)
