"""Splits, numbered examples, and writing a split to disk (resumably).

Example i of a split depends only on (split, seed, i): lists are
prefix-stable (the first 50 of n=100 are n=50), and a half-written dataset
can be finished by regenerating only the missing indices. Splits mix the
seed with their own code, so "train" and "test" never share an image even
under the same seed.

Held out of train and val, present in test:
- ``world.HELD_OUT_COMBOS``: 5 (colour, shape) pairs, never drawn or named;
  test favours them in basic and binding examples.
- ``entities.HELD_OUT_ENTITIES``: 16 entities (one per look-alike cluster),
  never drawn or named; test favours them in entity examples.

    >>> ex = make_examples("train", 3, seed=0)
    >>> [e.index for e in ex], ex[0].phenomenon in PHENOMENA
    ([0, 1, 2], True)
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clipmatch_export.synth.captions import ALL_COMBOS, PHENOMENA, SplitRules, compose
from clipmatch_export.synth.entities import HELD_OUT_ENTITIES, catalogue, write_knowledge_base
from clipmatch_export.synth.forms import Form, form_to_json, mentions
from clipmatch_export.synth.world import HELD_OUT_COMBOS, Scene, render, scene_to_json

__all__ = [
    "SPLITS", "DEFAULT_MIXTURE", "Example", "split_rules", "make_example", "make_examples",
    "example_record", "write_dataset", "read_records", "tokenizer_corpus", "all_caption_words",
]

SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
# Examples per block of 20: basic 20%, binding 20%, spatial 20%, negation 15%,
# entity 10%, look 15%. Blocks are shuffled, so even 20 examples hold every phenomenon.
DEFAULT_MIXTURE: dict[str, int] = {"basic": 4, "binding": 4, "spatial": 4, "negation": 3, "entity": 2, "look": 3}
_FSYNC_EVERY = 256  # lines between fsyncs while writing a split


@dataclass
class Example:
    """One image-caption pair with its hard negatives.

    scene: what the image shows (``render(scene)`` draws it).
    form: the caption's logical form; ``satisfies(other_scene, form)`` says
      whether any other image matches the caption too.
    negative_captions / negative_forms: hard negatives, false of ``scene``
      (1-3 for most phenomena, up to 4 for entities).
    negative_scene: a hard-negative image, true of negative_captions[0] and
      false of ``caption``; None never happens today but callers should allow it.
    explanation: the knowledge-base entry for entity examples, else None.
    held_out: the caption or the image involves a held-out combo or entity
      (test only); negatives are not counted.
    """

    index: int
    split: str
    phenomenon: str
    scene: Scene
    caption: str
    form: Form
    negative_captions: list[str]
    negative_forms: list[Form]
    negative_scene: Scene | None
    explanation: str | None
    entity: str | None
    held_out: bool


def split_rules(split: str) -> SplitRules:
    """What a split may draw and name.

    >>> len(split_rules("train").combos), len(split_rules("test").combos)
    (25, 30)
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    names = tuple(e.name for e in catalogue())
    if split == "test":
        return SplitRules(ALL_COMBOS, names, tuple(sorted(HELD_OUT_COMBOS)), tuple(sorted(HELD_OUT_ENTITIES)))
    return SplitRules(tuple(c for c in ALL_COMBOS if c not in HELD_OUT_COMBOS),
                      tuple(n for n in names if n not in HELD_OUT_ENTITIES))


def _slots(phenomena: Sequence[str], mixture: Mapping[str, int] | None) -> list[str]:
    weights = DEFAULT_MIXTURE if mixture is None else mixture
    unknown = [p for p in phenomena if p not in PHENOMENA]
    if unknown or not phenomena:
        raise ValueError(f"phenomena {list(phenomena)!r} must be a non-empty subset of {PHENOMENA}")
    slots = [p for p in phenomena for _ in range(int(weights.get(p, 0)))]
    if not slots:
        raise ValueError(f"mixture {dict(weights)!r} gives no weight to {list(phenomena)!r}")
    return slots


def _is_held_out(scenes: Sequence[Scene | None], forms: Sequence[Form]) -> bool:
    for f in forms:
        combos, names = mentions(f)
        if combos & HELD_OUT_COMBOS or names & HELD_OUT_ENTITIES:
            return True
    return any(o.combo in HELD_OUT_COMBOS or o.entity in HELD_OUT_ENTITIES
               for s in scenes if s is not None for o in s.objects)


def make_example(split: str, index: int, seed: int = 0, phenomena: Sequence[str] = PHENOMENA,
                 mixture: Mapping[str, int] | None = None, *, _rules: SplitRules | None = None) -> Example:
    """Example ``index`` of a split: depends on nothing else.

    >>> make_example("val", 7, seed=3).caption == make_example("val", 7, seed=3).caption
    True
    """
    rules = _rules if _rules is not None else split_rules(split)
    if index < 0 or seed < 0:
        raise ValueError(f"index {index} and seed {seed} must be non-negative")
    slots = _slots(phenomena, mixture)
    code = _SPLIT_CODE[split]
    # Stream 1 shuffles each block of slots; stream 0 draws the example itself.
    block = np.random.default_rng([seed, code, 1, index // len(slots)]).permutation(len(slots))
    phenomenon = slots[int(block[index % len(slots)])]
    d = compose(phenomenon, np.random.default_rng([seed, code, 0, index]), rules)
    # Held out = the positive itself needs generalisation; a seen entity whose
    # negatives name a held-out one is still a seen-entity example.
    held = _is_held_out((d.scene,), (d.form,))
    return Example(index, split, phenomenon, d.scene, d.caption, d.form, d.negative_captions, d.negative_forms,
                   d.negative_scene, d.explanation, d.entity, held)


def make_examples(split: str, n: int, seed: int = 0, phenomena: Sequence[str] = PHENOMENA,
                  mixture: Mapping[str, int] | None = None) -> list[Example]:
    """Examples 0..n-1 of a split.

    >>> sorted({e.phenomenon for e in make_examples("test", 20, seed=1)}) == sorted(PHENOMENA)
    True
    """
    rules = split_rules(split)
    return [make_example(split, i, seed, phenomena, mixture, _rules=rules) for i in range(n)]


def example_record(ex: Example, image: str, negative_image: str | None) -> dict:
    """The JSONL line for an example, given where its images are written.

    >>> r = example_record(make_example("train", 0), "train/images/000000.png", None)
    >>> sorted(r)[:4]
    ['caption', 'entity', 'explanation', 'form']
    """
    return {
        "index": ex.index,
        "image": image,
        "caption": ex.caption,
        "explanation": ex.explanation,
        "phenomenon": ex.phenomenon,
        "entity": ex.entity,
        "negative_captions": list(ex.negative_captions),
        "negative_image": negative_image,
        "form": form_to_json(ex.form),
        "negative_forms": [form_to_json(f) for f in ex.negative_forms],
        "scene": scene_to_json(ex.scene),
        "negative_scene": scene_to_json(ex.negative_scene) if ex.negative_scene is not None else None,
        "held_out": ex.held_out,
    }


def _save_png(array: np.ndarray, path: Path) -> None:
    # Write then rename: a killed run never leaves a half-written image.
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _recover(jsonl: Path) -> dict[int, dict]:
    # Read the lines a previous run finished; cut off a partial last line.
    if not jsonl.exists():
        return {}
    data = jsonl.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when no line is complete
    done: dict[int, dict] = {}
    lines = data[:end].split(b"\n")[:-1]  # every complete line, without its newline
    for k, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                # A torn last line that happens to end in a newline: drop it too.
                end = sum(len(x) + 1 for x in lines[:k])
                break
            raise ValueError(f"{jsonl}: line {k + 1} is not JSON; refusing to resume over it") from None
        if rec["index"] in done:
            raise ValueError(f"{jsonl}: index {rec['index']} written twice")
        done[rec["index"]] = rec
    if end != len(data):
        with open(jsonl, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return done


def write_dataset(out_dir: str | Path, split: str, n: int, seed: int = 0,
                  phenomena: Sequence[str] = PHENOMENA, mixture: Mapping[str, int] | None = None) -> Path:
    """Write examples 0..n-1 of a split and return the JSONL path.

    Layout: ``out_dir/<split>.jsonl`` (paths in it are relative to out_dir),
    ``out_dir/<split>/images/<index>.png`` and ``<index>_neg.png``, and
    ``out_dir/knowledge_base.json``. Resumable: run it again after a crash
    and it writes only the missing lines, each exactly once. Lines a previous
    run wrote must match this call's split and seed, or it refuses; lines
    beyond n from an earlier, longer run are kept.

    >>> import tempfile
    >>> p = write_dataset(tempfile.mkdtemp(), "val", 3, seed=0)
    >>> p.name, len(p.read_text().splitlines())
    ('val.jsonl', 3)
    """
    out = Path(out_dir)
    images = out / split / "images"
    images.mkdir(parents=True, exist_ok=True)
    write_knowledge_base(out / "knowledge_base.json")
    jsonl = out / f"{split}.jsonl"
    done = _recover(jsonl)
    rules = split_rules(split)
    # A resume under another seed or mixture would mix two datasets; the
    # first finished line tells.
    if done:
        k = min(done)
        ex = make_example(split, k, seed, phenomena, mixture, _rules=rules)
        if done[k]["caption"] != ex.caption or done[k]["scene"] != scene_to_json(ex.scene):
            raise ValueError(f"{jsonl} holds a different dataset (line for index {k} differs from split "
                             f"{split!r} seed {seed}); use another out_dir or delete it")
    todo = [i for i in range(n) if i not in done]
    with open(jsonl, "a", encoding="utf-8") as f:
        for count, i in enumerate(todo, 1):
            ex = make_example(split, i, seed, phenomena, mixture, _rules=rules)
            image = f"{split}/images/{i:06d}.png"
            _save_png(render(ex.scene), out / image)
            neg = None
            if ex.negative_scene is not None:
                neg = f"{split}/images/{i:06d}_neg.png"
                _save_png(render(ex.negative_scene), out / neg)
            # One write per whole line, after its images exist.
            f.write(json.dumps(example_record(ex, image, neg), ensure_ascii=False) + "\n")
            if count % _FSYNC_EVERY == 0:
                f.flush()
                os.fsync(f.fileno())
        f.flush()
        os.fsync(f.fileno())
    return jsonl


def read_records(path: str | Path) -> list[dict]:
    """The records of a written split, in file order.

    >>> import tempfile
    >>> len(read_records(write_dataset(tempfile.mkdtemp(), "test", 2)))
    2
    """
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenizer_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Training text for a tokenizer: train captions, their hard negatives and
    explanations, then every train entity's explanation. Held-out entity names
    are left out, as they are from every train caption.

    >>> c = tokenizer_corpus(40); any("left" in s for s in c), any(" dots " in s for s in c)
    (True, True)
    """
    out: list[str] = []
    for ex in make_examples("train", n, seed):
        out.append(ex.caption)
        out.extend(ex.negative_captions)
        if ex.explanation is not None:
            out.append(ex.explanation)
    out.extend(e.explanation for e in catalogue() if e.name not in HELD_OUT_ENTITIES)
    return out


def all_caption_words(n: int = 4000, seed: int = 0) -> list[str]:
    """Every distinct lower-case word of ``tokenizer_corpus(n, seed)``, sorted.

    >>> {"without", "absent", "stripes"} <= set(all_caption_words(200))
    True
    """
    return sorted({w for s in tokenizer_corpus(n, seed) for w in s.lower().replace(",", " ").split()})

