"""Train a small CLIP tokenizer and write it as a Hugging Face CLIP folder.

No pretrained CLIP tokenizer can be downloaded on these machines, so tiny test
models get their own: a byte-level BPE with exactly CLIP's pipeline (the one
``transformers.CLIPTokenizer`` builds), trained on a caption-like corpus.

The folder holds what openai/clip-vit-base-patch32 ships: ``tokenizer.json``,
``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
``special_tokens_map.json``. It differs from OpenAI's in one way: the special
tokens come first (``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1, which is
also unk and pad), where OpenAI's sit at the end of the vocabulary.

    >>> import tempfile
    >>> out = train_clip_tokenizer(default_corpus(), tempfile.mkdtemp())
    >>> sorted(p.name for p in out.iterdir())  # doctest: +NORMALIZE_WHITESPACE
    ['merges.txt', 'special_tokens_map.json', 'tokenizer.json',
     'tokenizer_config.json', 'vocab.json']
"""
from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, pre_tokenizers

from clipmatch.inputs.tokenizer import BOS_TOKEN as BOS
from clipmatch.inputs.tokenizer import EOS_TOKEN as EOS
from clipmatch.inputs.tokenizer import build_clip_backend

__all__ = [
    "BOS",
    "EOS",
    "DEFAULT_CORPUS",
    "default_corpus",
    "build_clip_tokenizer",
    "train_clip_tokenizer",
]

END_OF_WORD = "</w>"
# The header OpenAI's merges.txt starts with; the tokenizers reader skips it.
MERGES_HEADER = "#version: 0.2"

_BYTE_ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
# Two specials, then every byte symbol inside a word and at a word's end, so
# no text can ever need the unknown token (which is <|endoftext|>, and an
# EOT in mid-text would move the position CLIP pools at).
MIN_VOCAB_SIZE = 2 + 2 * len(_BYTE_ALPHABET)


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """CLIP's pipeline around a trained vocabulary, special tokens as OpenAI flags them.

    >>> build_clip_tokenizer({BOS: 0, EOS: 1, "a</w>": 2}, []).encode("A").ids
    [0, 2, 1]
    """
    # normalized=True as in OpenAI's folder: OpenAI's tokenizer lowercases
    # before it looks for special tokens, so "<|EndOfText|>" is one too.
    specials = [AddedToken(t, normalized=True, special=True) for t in (BOS, EOS)]
    return build_clip_backend(vocab, merges, added_tokens=specials, bos=BOS, eos=EOS, unk=EOS, pad=EOS)


def _train_bpe(words: collections.Counter[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    # A plain BPE loop rather than tokenizers' BpeTrainer: the trainer's
    # tie-breaking follows hash-map order, and these files must be
    # byte-identical from run to run. Ties go to the smallest pair.
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for sym in _BYTE_ALPHABET:
        vocab[sym] = len(vocab)
    for sym in _BYTE_ALPHABET:
        vocab[sym + END_OF_WORD] = len(vocab)

    # Each word as symbols; CLIP marks the last one with </w>.
    corpus = {tuple(w[:-1]) + (w[-1] + END_OF_WORD,): n for w, n in sorted(words.items())}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for syms, n in corpus.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += n
        if not pairs:
            break  # every word is a single token already
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        corpus = {_merge(syms, best): n for syms, n in corpus.items()}
    return vocab, merges


def _merge(syms: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(syms):
        if i + 1 < len(syms) and (syms[i], syms[i + 1]) == pair:
            out.append(syms[i] + syms[i + 1])
            i += 2
        else:
            out.append(syms[i])
            i += 1
    return tuple(out)


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def train_clip_tokenizer(
    texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1000, context_length: int = 77
) -> Path:
    """Train a CLIP byte-level BPE on ``texts`` and write a HF CLIP tokenizer folder.

    The vocabulary holds the 2 special tokens, the 512 byte symbols (plain and
    with ``</w>``), then merges until it has ``vocab_size`` entries or the
    corpus has no pair left to merge (a small corpus stops early). Same texts
    give byte-identical files.

    >>> import tempfile
    >>> out = train_clip_tokenizer(["a red cube", "a blue ball"], tempfile.mkdtemp(), vocab_size=520)
    >>> import transformers
    >>> ids = transformers.CLIPTokenizer.from_pretrained(out)("a red ball").input_ids
    >>> ids[0], ids[-1]  # <|startoftext|>, <|endoftext|>
    (0, 1)
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings, not a single string; wrap it in a list")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: CLIP needs {MIN_VOCAB_SIZE} "
            "(2 special tokens and 512 byte symbols) before any merge"
        )
    if context_length < 2:
        raise ValueError(f"context_length={context_length} leaves no room for <|startoftext|> and <|endoftext|>")

    # Words exactly as the finished tokenizer will see them.
    pipeline = build_clip_tokenizer({BOS: 0, EOS: 1}, [])
    words: collections.Counter[str] = collections.Counter()
    n_texts = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        n_texts += 1
        normalized = pipeline.normalizer.normalize_str(text)
        words.update(w for w, _ in pipeline.pre_tokenizer.pre_tokenize_str(normalized))
    if not words:
        raise ValueError(f"no words to train on in {n_texts} texts")

    vocab, merges = _train_bpe(words, vocab_size)
    tok = build_clip_tokenizer(vocab, merges)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (out / "vocab.json").write_text(_json(vocab), encoding="utf-8")
    (out / "merges.txt").write_text(
        "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n", encoding="utf-8"
    )
    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (out / "tokenizer_config.json").write_text(
        _json(
            {
                "add_prefix_space": False,
                "added_tokens_decoder": {
                    str(vocab[t]): {**special, "content": t, "special": True} for t in (BOS, EOS)
                },
                "bos_token": BOS,
                "clean_up_tokenization_spaces": False,
                "do_lower_case": True,
                "eos_token": EOS,
                "errors": "replace",
                "model_max_length": context_length,
                "pad_token": EOS,
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": EOS,
            }
        ),
        encoding="utf-8",
    )
    (out / "special_tokens_map.json").write_text(
        _json(
            {
                "bos_token": {**special, "content": BOS},
                "eos_token": {**special, "content": EOS},
                "pad_token": EOS,
                "unk_token": {**special, "content": EOS},
            }
        ),
        encoding="utf-8",
    )
    return out


# --- a built-in corpus -------------------------------------------------------
# Word lists for captions like the ones DCSM and the tests care about: colour
# and size binding, spatial relations and negation.
_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray", "pink"]
_SHAPES = ["cube", "ball", "sphere", "cylinder", "cone", "pyramid", "ring", "box", "block", "disk"]
_SIZES = ["small", "big", "large", "tiny", "huge", "little"]
_SPATIAL = [
    "above", "below", "left of", "right of", "to the left of", "to the right of",
    "behind", "in front of", "next to", "on top of", "under", "beside",
]
_NOUNS = [
    "dog", "cat", "car", "tree", "person", "man", "woman", "child", "bird", "horse",
    "table", "chair", "cup", "book", "boat", "house", "bicycle", "bench", "lamp", "bottle",
]
_VERBS = [
    "sitting", "standing", "running", "lying", "jumping", "eating", "sleeping",
    "playing", "walking", "looking up", "holding a ball", "waiting",
]


def _build_corpus() -> tuple[str, ...]:
    c, s, z, p, n, v = _COLOURS, _SHAPES, _SIZES, _SPATIAL, _NOUNS, _VERBS
    out: list[str] = []
    # Co-prime strides walk the lists so that every word meets many others.
    for i in range(40):
        out += [
            f"a {z[i % 6]} {c[i % 11]} {s[i % 10]} {p[i % 12]} a {c[(i * 3 + 1) % 11]} {s[(i * 7 + 3) % 10]}",
            f"a {n[i % 20]} {v[i % 12]} {p[(i * 5 + 2) % 12]} a {n[(i * 3 + 7) % 20]}",
            f"a {c[(i * 2) % 11]} {n[i % 20]} but no {n[(i * 7 + 1) % 20]}",
            f"a {z[(i + 1) % 6]} {n[(i * 3) % 20]} without a {c[(i * 5) % 11]} {s[i % 10]}",
            f"the {n[(i * 11) % 20]} is not {v[(i * 5) % 12]}",
            f"there is no {c[(i * 7) % 11]} {s[(i * 3) % 10]} in the picture",
            f"the {c[i % 11]} {n[(i * 13 + 5) % 20]} is absent, but a {z[i % 6]} {n[i % 20]} is there",
            f"a photo of a {z[(i * 5) % 6]} {c[(i * 3) % 11]} {n[(i * 9 + 2) % 20]}",
        ]
    return tuple(out)


DEFAULT_CORPUS: tuple[str, ...] = _build_corpus()


def default_corpus() -> list[str]:
    """A few hundred caption-like sentences, built from word lists, no download.

    >>> corpus = default_corpus()
    >>> len(corpus), corpus[0]
    (320, 'a small red cube above a blue cylinder')
    """
    return list(DEFAULT_CORPUS)
