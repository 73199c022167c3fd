"""Training data as JSONL: one image-text pair per line.

    {"image": "images/0001.png", "caption": "a red circle left of a blue square",
     "explanation": null, "negative_captions": ["a blue square left of a red circle"],
     "negative_image": "images/0001_neg.png"}

``image`` and ``caption`` are required; ``explanation`` (what the caption
names looks like), ``negative_captions`` and ``negative_image`` (hard
negatives) are optional; other fields are kept in ``extra``. Paths are
relative to the JSONL file's folder. Every problem names the file and line;
with ``skip_bad=True`` bad lines are skipped, counted and listed instead.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipmatch.errors import DatasetError, ModelNotFoundError
from clipmatch.explain.explainers import KnowledgeBaseExplainer


@dataclass(frozen=True)
class Record:
    line: int
    image: Path
    caption: str
    explanation: str | None = None
    negative_captions: tuple[str, ...] = ()
    negative_image: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class ReadReport:
    path: Path
    lines: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per skipped line

    def summary(self) -> str:
        text = f"{self.path}: {self.kept} of {self.lines} records kept"
        if self.skipped:
            text += f", {len(self.skipped)} skipped:\n  " + "\n  ".join(self.skipped[:20])
            if len(self.skipped) > 20:
                text += f"\n  ... and {len(self.skipped) - 20} more"
        return text


def read_jsonl(path: str | Path, *, skip_bad: bool = False, knowledge_base: Mapping[str, str] | None = None,
               max_words: int | None = None) -> tuple[list[Record], ReadReport]:
    """Read and check every record.

    ``knowledge_base`` fills a missing explanation from the record's
    ``entity`` field; an entity the knowledge base lacks is an error.
    ``max_words`` bounds caption length (a cheap guard; the tokenizer decides
    the real token count later).

    >>> records, report = read_jsonl("data/train.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"dataset file not found: {path}")
    root = path.parent
    report = ReadReport(path)
    records: list[Record] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            report.lines += 1
            try:
                records.append(_parse(line, number, root, knowledge_base, max_words, str(path)))
            except DatasetError as exc:
                if not skip_bad:
                    raise
                report.skipped.append(str(exc))
    report.kept = len(records)
    if not records:
        raise DatasetError(f"no usable records ({report.lines} lines, {len(report.skipped)} skipped)", path=str(path))
    return records, report


def _parse(line: str, number: int, root: Path, kb: Mapping[str, str] | None, max_words: int | None,
           where: str) -> Record:
    def fail(message: str) -> DatasetError:
        return DatasetError(message, index=number, path=where)

    if not line.strip():
        raise fail("empty line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("image", "caption"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise fail(f"{key!r} must be a non-empty string, got {obj.get(key)!r}")
    caption = obj["caption"].strip()
    if max_words is not None and len(caption.split()) > max_words:
        raise fail(f"caption has {len(caption.split())} words, more than the text context allows (~{max_words})")
    image = _existing(root, obj["image"], fail)
    explanation = obj.get("explanation")
    if explanation is not None and (not isinstance(explanation, str) or not explanation.strip()):
        raise fail(f"'explanation' must be a non-empty string or null, got {explanation!r}")
    entity = obj.get("entity")
    if explanation is None and entity is not None and kb is not None:
        if entity not in kb:
            raise fail(f"entity {entity!r} is not in the knowledge base")
        explanation = kb[entity]
    negatives = obj.get("negative_captions") or []
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise fail(f"'negative_captions' must be a list of non-empty strings, got {negatives!r}")
    extra_fields: dict[str, Any] = {}
    if kb is not None and entity is not None and negatives:
        # The look-alikes' own explanations: what tells them apart from this entity.
        extra_fields["negative_explanations"] = [kb_explanation(n, kb) for n in negatives]
    negative_image = obj.get("negative_image")
    negative_path = _existing(root, negative_image, fail) if negative_image is not None else None
    known = {"image", "caption", "explanation", "negative_captions", "negative_image"}
    return Record(number, image, caption, explanation, tuple(negatives), negative_path,
                  {k: v for k, v in obj.items() if k not in known} | extra_fields)


def kb_explanation(text: str, kb: Mapping[str, str]) -> str | None:
    """The explanation of the longest knowledge-base name that ``text`` mentions: the SDK's
    own lookup (``KnowledgeBaseExplainer``), so training reads what the search reads.

    >>> kb_explanation("a photo of the Y-20", {"Y-2": "a square", "Y-20": "a cross"})
    'a cross'
    """
    return _lookup(tuple(kb.items())).explain(text).text


@functools.lru_cache(maxsize=8)
def _lookup(entries: tuple[tuple[str, str], ...]) -> KnowledgeBaseExplainer:
    return KnowledgeBaseExplainer(dict(entries))


def _existing(root: Path, rel: Any, fail) -> Path:
    if not isinstance(rel, str):
        raise fail(f"image path must be a string, got {rel!r}")
    p = (root / rel) if not Path(rel).is_absolute() else Path(rel)
    if not p.is_file():
        raise fail(f"image file not found: {p}")
    return p
