"""CLIP tokenisation without torch or transformers.

``ClipTokenizer`` gives the same ids as ``transformers.CLIPTokenizer`` (which
in transformers 5 is backed by ``tokenizers``): like transformers, it reads only
the vocabulary, the merges and the added tokens from a folder, and always builds
CLIP's own pipeline around them (NFC, whitespace collapsed, lowercase; CLIP's
word regex then byte-level; BPE with ``</w>`` ending each word;
``<|startoftext|> ... <|endoftext|>``).

On top of the ids it reports what the towers and heads need and a plain
tokenizer hides: which texts were cut (CLIP pools at the end-of-text token, so
a cut text still ends with it), and where the functional words DCSM scores
with learned columns sit.

    >>> tok = ClipTokenizer.from_dir(_demo_folder())  # one token per letter
    >>> batch = tok(["a cube left of", "no-cat"], functional_words=["left", "no"])
    >>> batch.functional_ids.tolist()
    [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0], [0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from clipmatch.errors import IncompatibleModelError, InputError, ModelNotFoundError, TextError
from clipmatch.inputs.texts import prepare_texts

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "DEFAULT_CONTEXT_LENGTH", "ClipTokenizer", "TokenBatch", "build_clip_backend"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's text tower has 77 positions.
DEFAULT_CONTEXT_LENGTH = 77
# transformers writes a huge model_max_length (1e30) when a folder does not
# say; anything above this is "not set", not a real context length.
_SANE_MAX_LENGTH = 10000
# CLIP's word pattern, as transformers' CLIPTokenizer spells it.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def build_clip_backend(
    vocab: dict[str, int],
    merges: Sequence[tuple[str, str]],
    *,
    added_tokens: Sequence[AddedToken] = (),
    bos: str = BOS_TOKEN,
    eos: str = EOS_TOKEN,
    unk: str = EOS_TOKEN,
    pad: str = EOS_TOKEN,
) -> Tokenizer:
    """CLIP's ``tokenizers`` pipeline around a BPE vocabulary, as transformers builds it.

    bos, eos, unk and pad are added as special tokens (normalized=False, as
    transformers does when no file says otherwise) unless ``added_tokens``
    lists them.

    >>> tok = build_clip_backend({BOS_TOKEN: 0, EOS_TOKEN: 1, "a</w>": 2}, [])
    >>> tok.encode("A").ids
    [0, 2, 1]
    """
    tok = Tokenizer(
        BPE(
            vocab=dict(vocab),
            merges=list(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=unk,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    listed = {t.content for t in added_tokens}
    unlisted = [t for t in dict.fromkeys((bos, eos, unk, pad)) if t not in listed]
    defaults = [AddedToken(t, normalized=False, special=True) for t in unlisted]
    tok.add_special_tokens([t for t in added_tokens if t.special] + defaults)
    tok.add_tokens([t for t in added_tokens if not t.special])
    tok.post_processor = processors.RobertaProcessing(
        (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return tok


@dataclass
class TokenBatch:
    """Token ids for N texts, right-padded to a common length T.

    ``truncated[i]`` is True when text i lost tokens to the length limit; it
    still ends with ``<|endoftext|>`` unless ``fit`` cut it afterwards.
    """

    input_ids: np.ndarray  # (N, T) int64
    attention_mask: np.ndarray  # (N, T) int64, 1 on real tokens (BOS and EOT included)
    functional_ids: np.ndarray  # (N, T) int64, j + 1 on the tokens of functional word j, else 0
    truncated: np.ndarray  # (N,) bool
    lengths: np.ndarray  # (N,) int64, real tokens per row
    pad_id: int  # what fit() pads input_ids with

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def fit(self, length: int) -> TokenBatch:
        """Right-pad or cut every row to exactly ``length`` columns.

        A cut keeps the prefix and does not put EOT back: fixed-length heads
        (DCSM) read token positions, not the pooled EOT. Rows that lose real
        tokens are marked truncated.

        >>> b = TokenBatch(np.array([[0, 5, 1]]), np.ones((1, 3), np.int64),
        ...                np.zeros((1, 3), np.int64), np.array([False]), np.array([3]), pad_id=1)
        >>> b.fit(5).input_ids.tolist(), b.fit(2).input_ids.tolist(), b.fit(2).truncated.tolist()
        ([[0, 5, 1, 1, 1]], [[0, 5]], [True])
        """
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise InputError(f"fit length must be a positive int, got {length!r}")
        n, t = self.input_ids.shape
        if length <= t:
            cols = slice(0, length)
            return TokenBatch(
                input_ids=self.input_ids[:, cols].copy(),
                attention_mask=self.attention_mask[:, cols].copy(),
                functional_ids=self.functional_ids[:, cols].copy(),
                truncated=self.truncated | (self.lengths > length),
                lengths=np.minimum(self.lengths, length),
                pad_id=self.pad_id,
            )
        extra = length - t

        def pad(a: np.ndarray, value: int) -> np.ndarray:
            return np.concatenate([a, np.full((n, extra), value, dtype=np.int64)], axis=1)

        return TokenBatch(
            input_ids=pad(self.input_ids, self.pad_id),
            attention_mask=pad(self.attention_mask, 0),
            functional_ids=pad(self.functional_ids, 0),
            truncated=self.truncated.copy(),
            lengths=self.lengths.copy(),
            pad_id=self.pad_id,
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IncompatibleModelError(f"cannot parse {path}: {exc}") from exc


def _token_content(value: Any, key: str, source: Path) -> str | None:
    # Configs spell a token either as a string or as a serialised AddedToken.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise IncompatibleModelError(f"{source}: {key} is {value!r}, expected a token string")


def _added_token(entry: Any, source: Path) -> AddedToken:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise IncompatibleModelError(f"{source}: added token {entry!r} has no string 'content'")
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(entry["content"], **{k: bool(entry[k]) for k in flags if k in entry})


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[AddedToken]]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise IncompatibleModelError(f"{path} has no 'model' object; is it a tokenizers file?")
    if model.get("type", "BPE") != "BPE":
        raise IncompatibleModelError(f"{path} holds a {model.get('type')!r} model; CLIP uses 'BPE'")
    if model.get("end_of_word_suffix", END_OF_WORD) != END_OF_WORD:
        raise IncompatibleModelError(
            f"{path}: end_of_word_suffix is {model.get('end_of_word_suffix')!r}; CLIP's BPE uses {END_OF_WORD!r}"
        )
    vocab, raw_merges = model.get("vocab"), model.get("merges", [])
    if not isinstance(vocab, dict) or not isinstance(raw_merges, list):
        raise IncompatibleModelError(f"{path}: model.vocab must be an object and model.merges a list")
    merges = []
    for m in raw_merges:
        # tokenizers < 0.20 wrote "a b", later versions write ["a", "b"].
        pair = tuple(m.split(" ")) if isinstance(m, str) else tuple(m) if isinstance(m, list) else ()
        if len(pair) != 2:
            raise IncompatibleModelError(f"{path}: merge {m!r} is not a pair")
        merges.append(pair)
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise IncompatibleModelError(f"{path}: added_tokens must be a list")
    return vocab, merges, [_added_token(e, path) for e in added]


def _demo_folder() -> str:
    # For the examples here: a CLIP tokenizer whose tokens are single letters
    # (plain and word-final) and a comma and a hyphen, in a temporary folder.
    import string
    import tempfile

    symbols = string.ascii_lowercase + ",-"
    letters = [c + suffix for suffix in ("", END_OF_WORD) for c in symbols]
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1, **{t: i + 2 for i, t in enumerate(letters)}}
    folder = tempfile.mkdtemp(prefix="clipmatch-demo-tokenizer-")
    build_clip_backend(vocab, []).save(f"{folder}/tokenizer.json")
    return folder


def _word_key(word: str) -> str:
    # Same folding the tokenizer applies (NFC, lowercase), so "LEFT" is "left".
    return unicodedata.normalize("NFC", word).lower()


class ClipTokenizer:
    """CLIP tokenizer loaded from a Hugging Face tokenizer folder.

    Attributes: ``context_length`` (default length limit, counting BOS and
    EOT), ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size`` (added tokens
    included) and ``identity``: the sha256 of the rebuilt ``tokenizers``
    pipeline's JSON (vocabulary, merges, added tokens with their flags,
    normalizer, pre-tokenizer, post-processor), keys sorted. A folder's
    tokenizer.json and its vocab.json + merges.txt give the same identity
    when they hold the same vocabulary, merges and added-token flags (flags
    come from tokenizer_config.json first, then tokenizer.json, then defaults);
    the JSON layout can change with the ``tokenizers`` version, and so can the
    identity. ``context_length`` and ``pad_id`` are not part of it.
    """

    def __init__(self, backend: Tokenizer, *, context_length: int, bos: str, eos: str, pad: str):
        self.backend = backend
        self.context_length = context_length
        self.bos_id = backend.token_to_id(bos)
        self.eos_id = backend.token_to_id(eos)
        self.pad_id = backend.token_to_id(pad)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        pipeline = json.loads(backend.to_str())
        canonical = json.dumps(pipeline, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        self.identity = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        # In-text special tokens get word ids from tokenizers; they are never functional.
        self._special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}

    def __repr__(self) -> str:
        return (
            f"ClipTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"identity={self.identity[:12]})"
        )

    @property
    def special_ids(self) -> set[int]:
        """Ids of the special tokens (start, end, padding, unknown)."""
        return set(self._special_ids)

    @classmethod
    def from_dir(cls, path: str | Path, *, context_length: int | None = None) -> ClipTokenizer:
        """Load ``tokenizer.json``, or else ``vocab.json`` + ``merges.txt``, from a folder.

        >>> tok = ClipTokenizer.from_dir(_demo_folder())
        >>> tok.bos_id, tok.eos_id, tok.pad_id, tok.context_length
        (0, 1, 1, 77)
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ModelNotFoundError(f"tokenizer folder {str(folder)!r} does not exist (or is not a folder)")
        tokenizer_json = folder / "tokenizer.json"
        vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
        if tokenizer_json.is_file():
            vocab, merges, file_added = _read_tokenizer_json(tokenizer_json)
        else:
            missing = [p.name for p in (vocab_json, merges_txt) if not p.is_file()]
            if missing:
                raise ModelNotFoundError(
                    f"tokenizer folder {str(folder)!r} lacks tokenizer.json and {' and '.join(missing)}: "
                    "it needs tokenizer.json, or vocab.json and merges.txt"
                )
            try:
                # The tokenizers reader skips merges.txt's "#version" header, as transformers does.
                vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))
            except Exception as exc:  # tokenizers raises plain Exception
                raise IncompatibleModelError(f"cannot read {vocab_json} and {merges_txt}: {exc}") from exc
            file_added = []

        config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        token_map = _read_json(map_path) if map_path.is_file() else {}
        if not isinstance(config, dict) or not isinstance(token_map, dict):
            raise IncompatibleModelError(f"{config_path} and {map_path} must each hold a JSON object")

        def special(key: str, default: str) -> str:
            # tokenizer_config.json wins, as in transformers.
            for source, values in ((config_path, config), (map_path, token_map)):
                content = _token_content(values.get(key), key, source)
                if content is not None:
                    return content
            return default

        bos, eos = special("bos_token", BOS_TOKEN), special("eos_token", EOS_TOKEN)
        unk, pad = special("unk_token", EOS_TOKEN), special("pad_token", eos)

        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise IncompatibleModelError(f"{config_path}: added_tokens_decoder must be an object")
        added = {t.content: t for t in file_added}
        added.update((t.content, t) for t in (_added_token(e, config_path) for e in decoder.values()))

        missing = [t for t in dict.fromkeys((bos, eos, unk, pad)) if t not in vocab and t not in added]
        if missing:
            raise IncompatibleModelError(
                f"tokenizer in {str(folder)!r} lacks CLIP special tokens {missing}; "
                f"CLIP needs bos {bos!r}, eos {eos!r} (also unk {unk!r}, pad {pad!r}) in its vocabulary"
            )
        try:
            backend = build_clip_backend(
                vocab, merges, added_tokens=list(added.values()), bos=bos, eos=eos, unk=unk, pad=pad
            )
        except Exception as exc:  # e.g. a merge naming a token the vocabulary lacks
            raise IncompatibleModelError(f"cannot build a CLIP BPE from {str(folder)!r}: {exc}") from exc

        if context_length is None:
            configured = config.get("model_max_length")
            sane = isinstance(configured, int) and not isinstance(configured, bool)
            context_length = configured if sane and 2 <= configured <= _SANE_MAX_LENGTH else DEFAULT_CONTEXT_LENGTH
        elif isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise InputError(f"context_length must be an int >= 2 (BOS and EOT), got {context_length!r}")
        return cls(backend, context_length=context_length, bos=bos, eos=eos, pad=pad)

    def _functional_keys(self, functional_words: Sequence[str]) -> dict[str, int]:
        if isinstance(functional_words, str):
            raise InputError(f"functional_words must be a list of words, not the string {functional_words!r}")
        keys: dict[str, int] = {}
        for j, word in enumerate(functional_words):
            if not isinstance(word, str) or not word or any(c.isspace() for c in word):
                raise InputError(f"functional word {j} ({word!r}) must be a single word without spaces")
            # It must be one word to the tokenizer too, or it could never match.
            normalized = self.backend.normalizer.normalize_str(word)
            pieces = [w for w, _ in self.backend.pre_tokenizer.pre_tokenize_str(normalized)]
            if len(pieces) != 1:
                raise InputError(
                    f"functional word {j} ({word!r}) is {len(pieces)} words to the CLIP tokenizer ({pieces}); "
                    "it must be one"
                )
            keys.setdefault(_word_key(word), j + 1)  # a repeated word keeps its first position
        return keys

    def __call__(
        self, texts: Sequence[str], *, max_length: int | None = None, functional_words: Sequence[str] = ()
    ) -> TokenBatch:
        """Tokenise a batch: BOS + tokens + EOT, cut to the limit, right-padded.

        Texts longer than ``max_length`` (default ``context_length``) tokens
        keep their first ``max_length - 1`` tokens plus EOT, and are flagged in
        ``truncated``. ``functional_ids`` marks every token of a word that
        equals ``functional_words[j]`` (case-insensitively) with j + 1; words
        are the tokenizer's own (CLIP's regex), so "left" matches in "left of"
        but not in "leftover", and "no" matches in "no-cat".

        >>> tok = ClipTokenizer.from_dir(_demo_folder())  # one token per letter
        >>> b = tok(["a dog, not a cat", "no"], max_length=8, functional_words=["not"])
        >>> b.input_ids.shape, b.truncated.tolist(), b.lengths.tolist(), int(b.input_ids[0, -1]) == tok.eos_id
        ((2, 8), [True, False], [8, 4], True)
        >>> b.functional_ids[0].tolist()  # the cut kept only the "n" of "not"
        [0, 0, 0, 0, 0, 0, 1, 0]
        """
        items, precut = prepare_texts(texts)  # valid Unicode, and a length the tokenizer takes at once

        limit = self.context_length if max_length is None else max_length
        if isinstance(limit, bool) or not isinstance(limit, int) or not 2 <= limit <= self.context_length:
            raise InputError(
                f"max_length must be an int from 2 (BOS and EOT) to context_length={self.context_length}, "
                f"got {max_length!r}"
            )
        keys = self._functional_keys(functional_words)

        rows: list[list[int]] = []
        marks: list[list[int]] = []
        truncated: list[bool] = []
        for i, (text, enc) in enumerate(zip(items, self.backend.encode_batch(items))):
            ids = enc.ids
            if len(ids) <= 2:
                raise TextError(f"text encodes to no tokens: {text!r}", index=i)
            fids = self._mark(text, enc, keys) if keys else [0] * len(ids)
            cut = len(ids) > limit
            if cut:  # keep the prefix, end on EOT where CLIP pools
                ids = ids[: limit - 1] + [self.eos_id]
                fids = fids[: limit - 1] + [0]
            rows.append(ids)
            marks.append(fids)
            truncated.append(cut or precut[i])

        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max())
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        functional_ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, (ids, fids) in enumerate(zip(rows, marks)):
            input_ids[i, : len(ids)] = ids
            functional_ids[i, : len(fids)] = fids
        attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        return TokenBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            functional_ids=functional_ids,
            truncated=np.array(truncated, dtype=bool),
            lengths=lengths,
            pad_id=self.pad_id,
        )

    def _mark(self, text: str, enc: Any, keys: dict[str, int]) -> list[int]:
        # A word is one pre-token: its tokens share a word id, and its text is
        # the span their offsets (into the caller's string) cover.
        spans: dict[int, tuple[int, int]] = {}
        for w, (start, end) in zip(enc.word_ids, enc.offsets):
            if w is not None:
                s, e = spans.get(w, (start, end))
                spans[w] = (min(s, start), max(e, end))
        marked = {w: keys.get(_word_key(text[s:e]), 0) for w, (s, e) in spans.items()}
        return [
            0 if w is None or tid in self._special_ids else marked[w] for w, tid in zip(enc.word_ids, enc.ids)
        ]
