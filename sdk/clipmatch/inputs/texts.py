"""Texts as callers hand them in, made safe to tokenise: one place for every text path.

Two limits, both named in the error or the result:

- a text must be valid Unicode: a lone surrogate (what ``errors='surrogateescape'``
  makes of a byte that is not UTF-8, as in a command-line argument) is refused by
  name, where the tokenizer would fail with a bare ``TypeError``;
- a text past ``MAX_TEXT_CHARS`` characters is cut before it is tokenised (its
  white space collapsed first, as CLIP's normaliser does anyway) and reported as
  truncated: the towers read at most 77 tokens, and tokenising a 1 MB query in
  full took 1.8 s here. 16,384 characters are at least ten times what 77 tokens
  can cover (CLIP's longest vocabulary entry is under 20 characters), so the cut
  never changes the tokens a tower reads.
"""
from __future__ import annotations

from collections.abc import Sequence

from clipmatch.errors import InputError, TextError

__all__ = ["MAX_TEXT_CHARS", "prepare_texts"]

MAX_TEXT_CHARS = 16_384


def prepare_texts(texts: Sequence[str]) -> tuple[list[str], list[bool]]:
    """The texts ready for the tokenizer, and which of them were cut before it."""
    if isinstance(texts, (str, bytes)):
        raise TextError(f"texts must be a list of strings; got a single {type(texts).__name__}, pass [text]")
    try:
        items = list(texts)
    except TypeError:
        raise TextError(f"texts must be a list of strings, got {type(texts).__name__}") from None
    if not items:
        raise InputError("no texts given")
    out, cut = [], []
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TextError(f"expected a str, got {type(text).__name__}", index=i)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TextError(f"text holds {text[exc.start:exc.end]!r} at position {exc.start}, which is not valid "
                            "Unicode (a lone surrogate: bytes that were not UTF-8?); decode them with "
                            "errors='replace'", index=i) from None
        if not text.strip():
            raise TextError(f"text is empty or only whitespace: {text!r}", index=i)
        long = False
        if len(text) > MAX_TEXT_CHARS:
            text = " ".join(text.split())  # what CLIP's normaliser makes of it: nothing is lost yet
            long = len(text) > MAX_TEXT_CHARS
            text = text[:MAX_TEXT_CHARS]
        out.append(text)
        cut.append(long)
    return out, cut
