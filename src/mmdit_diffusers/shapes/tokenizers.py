"""Build small CLIP and T5 tokenizers locally, from a word list, with no download.

They are real tokenizers in the files the originals ship, so `transformers` loads them like any other:

- `build_clip_tokenizer(words, dir)`: a byte-level BPE in CLIP's layout (`vocab.json` + `merges.txt`, lower-cased,
  `<|startoftext|>` / `<|endoftext|>`), loadable with `transformers.CLIPTokenizer.from_pretrained(dir)`.
- `build_t5_tokenizer(words, dir)`: a SentencePiece-style Unigram in T5's layout (`tokenizer.json`, `<pad>`=0,
  `</s>`=1, `<unk>`=2, `</s>` appended), loadable with `transformers.T5TokenizerFast.from_pretrained(dir)` or
  `AutoTokenizer.from_pretrained(dir)`.

Every given word is one token; any other text still tokenizes (CLIP falls back to its 256 byte symbols, T5 to
single characters, then `<unk>` for characters outside printable ASCII and the words). The result depends only on
the word list, so a tiny pipeline built twice has the same vocabulary. Pair them with text encoders whose
`vocab_size` is `len(tokenizer)` (for CLIP: `bos_token_id = len - 2`, `eos_token_id = pad_token_id = len - 1`).

Example:
    >>> from transformers import CLIPTokenizer, T5TokenizerFast
    >>> build_clip_tokenizer(["red", "circle"], "tok/clip")
    >>> CLIPTokenizer.from_pretrained("tok/clip")("a red circle").input_ids
"""

from __future__ import annotations

import collections
import json
import os
import string
import unicodedata
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_WORD_END = "</w>"
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, punctuation runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Unigram log-probabilities: a whole word beats any spelling of it; single characters are the fallback.
_WORD_SCORE, _CHAR_SCORE, _SPACE_SCORE = -3.0, -10.0, -2.0


def build_clip_tokenizer(
    vocabulary_words: Iterable[str], save_dir: str | os.PathLike, model_max_length: int = 77
) -> str:
    """Write a CLIP tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`) to `save_dir`.

    The vocabulary is CLIP's: the 256 byte-level symbols, the same with the end-of-word marker `</w>`, one merge
    result per learned merge, then `<|startoftext|>` and `<|endoftext|>` (also the padding and unknown token).
    Merges are learned with byte-level BPE on the lower-cased words until each word is a single token.

    Args:
        vocabulary_words: Words that should each become one token (case-insensitive; duplicates are fine).
        save_dir: Folder to write (created if missing).
        model_max_length: Longest tokenized sequence (CLIP's text positions: 77).

    Returns:
        `save_dir` as a string.
    """
    words = _unique_words(vocabulary_words)
    merges = _learn_clip_merges(words)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + _WORD_END for c in alphabet), *("".join(pair) for pair in merges), CLIP_BOS, CLIP_EOS]:
        vocab.setdefault(token, len(vocab))

    os.makedirs(save_dir, exist_ok=True)
    _write_json(os.path.join(save_dir, "vocab.json"), vocab)
    with open(os.path.join(save_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    _write_json(
        os.path.join(save_dir, "tokenizer_config.json"),
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": model_max_length,
            "bos_token": CLIP_BOS,
            "eos_token": CLIP_EOS,
            "unk_token": CLIP_EOS,
            "pad_token": CLIP_EOS,
            "do_lower_case": True,
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(
        os.path.join(save_dir, "special_tokens_map.json"),
        {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS},
    )
    return str(save_dir)


def build_t5_tokenizer(
    vocabulary_words: Iterable[str], save_dir: str | os.PathLike, model_max_length: int = 512
) -> str:
    """Write a T5 tokenizer (`tokenizer.json`, `tokenizer_config.json`) to `save_dir`.

    The model is a Unigram over `<pad>`, `</s>`, `<unk>` (ids 0, 1, 2, as T5), the word-start marker `▁`, every
    word as `▁word`, and every character of the words and of printable ASCII alone and as `▁c`. Text is split on
    whitespace and `</s>` is appended, as T5; there are no `<extra_id_*>` sentinels (`extra_ids=0`). Case is kept.

    Args:
        vocabulary_words: Words that should each become one token.
        save_dir: Folder to write (created if missing).
        model_max_length: Longest tokenized sequence.

    Returns:
        `save_dir` as a string.
    """
    words = _unique_words(vocabulary_words, lower=False)
    chars = sorted({c for w in words for c in w} | set(string.ascii_letters + string.digits + string.punctuation))
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", _SPACE_SCORE)]
    pieces += [("▁" + w, _WORD_SCORE) for w in words]
    pieces += [(p, _CHAR_SCORE) for c in chars for p in (c, "▁" + c)]
    seen: set[str] = set()
    pieces = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]

    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    # The same pipeline as transformers' T5 tokenizer, so it loads identically from tokenizer.json or the vocab.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    tokenizer.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])

    os.makedirs(save_dir, exist_ok=True)
    tokenizer.save(os.path.join(save_dir, "tokenizer.json"))
    _write_json(
        os.path.join(save_dir, "tokenizer_config.json"),
        {
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": model_max_length,
            "eos_token": T5_EOS,
            "unk_token": T5_UNK,
            "pad_token": T5_PAD,
            "extra_ids": 0,
            "additional_special_tokens": [],
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(
        os.path.join(save_dir, "special_tokens_map.json"), {"eos_token": T5_EOS, "unk_token": T5_UNK, "pad_token": T5_PAD}
    )
    return str(save_dir)


def _learn_clip_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges (CLIP's normaliser, pre-tokenizer and `</w>`) until every word is one token.

    Each merge joins the most frequent adjacent pair of symbols, ties going to the smallest pair, so the same
    words always give the same merges (the `tokenizers` trainer breaks ties in hash order, differently per process).
    """
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts = collections.Counter(
        piece for word in words for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(word))
    )
    spellings = {piece: [*piece[:-1], piece[-1] + _WORD_END] for piece in counts}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for piece, symbols in spellings.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[piece]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        spellings = {piece: _merge(symbols, best) for piece, symbols in spellings.items()}


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """`symbols` with every non-overlapping occurrence of `pair`, left to right, joined into one symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table in its usual order: printable bytes map to themselves, the rest to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    return [chars[b] for b in order]


def _unique_words(words: Iterable[str], lower: bool = True) -> list[str]:
    if isinstance(words, str):
        raise TypeError("`vocabulary_words` must be an iterable of words, not one string.")
    out: dict[str, None] = {}
    for text in words:
        for word in unicodedata.normalize("NFC", str(text)).split():
            out[word.lower() if lower else word] = None
    if not out:
        raise ValueError("`vocabulary_words` is empty: give at least one word.")
    return list(out)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
