"""Invented named things, how each one looks, and the knowledge base that says so.

An entity is an object with a body (shape + colour), a pattern in a second
colour and a mark. Entities come in look-alike clusters of four: the same
shape and body colour, told apart only by pattern, pattern colour or mark, so
that the names of a cluster are each other's hard negatives.

The knowledge base explains every entity in the words captions use: what
the Kestrel-7 valve looks like, "a blue circle with yellow stripes and a white
dot". The entry does not repeat the name: for a name the towers never saw, the
name's tokens only pull the explanation's embedding towards whatever look-alike
they resemble (measured on towers trained with the "look" examples: an image
of a held-out entity picked its own explanation among its look-alikes' 9% of
the time with "the <name> is ..." entries, 76% with bare descriptions). One entity per
cluster is held out: its name never appears in a train or val caption, yet
every word of its explanation does, through its cluster mates and the "look"
examples.

    >>> e = catalogue()[0]
    >>> knowledge_base()[e.name] == e.explanation
    True
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipmatch_export.synth.world import COLOURS, HELD_OUT_COMBOS, MARKS, PATTERNS, SHAPES, Obj

__all__ = [
    "Entity", "catalogue", "get_entity", "HELD_OUT_ENTITIES", "lookalikes",
    "knowledge_base", "write_knowledge_base", "article", "contrast", "MIN_CONTRAST",
    "NAME_PATTERN", "invented_name", "rename_entities",
]

_CATALOGUE_SEED = 7_2025  # fixed: the catalogue is part of the data's definition
_N_CLUSTERS = 16
_PER_CLUSTER = 4
# Pattern on body must stay readable at 64x64: no yellow stripes on orange.
MIN_CONTRAST = 150.0

# Invented words, one per entity, so a held-out name shares no word with a
# seen one except its noun. None is a substring of another.
_WORDS = (
    "Kestrel", "Orrin", "Vasta", "Tolvar", "Quenby", "Marsk", "Ilvane", "Drosk",
    "Pelion", "Zarith", "Obrin", "Calvex", "Yendra", "Thessa", "Rukan", "Felmot",
    "Hollin", "Juvar", "Lenko", "Morvit", "Nalda", "Ostrav", "Pravin", "Sorel",
    "Tavik", "Ulmer", "Veska", "Wendal", "Xaro", "Yorrik", "Zemla", "Arvo",
    "Belka", "Corvin", "Dunmar", "Esker", "Fennick", "Galvo", "Harrow", "Istra",
    "Jorvik", "Kalder", "Lumin", "Mireth", "Noxen", "Oberon", "Pellam", "Quorra",
    "Rastin", "Selvo", "Tirren", "Umbrel", "Varro", "Wistan", "Yalder", "Zorn",
    "Aldren", "Brevik", "Caska", "Delvin", "Emrik", "Fyran", "Grelda", "Hestra",
)
_NOUNS = (
    "valve", "pump", "drone", "beacon", "lantern", "relay", "kettle", "rover",
    "sensor", "buoy", "gauge", "turbine", "compass", "capsule", "sprocket", "totem",
)


def article(phrase: str) -> str:
    """"a" or "an" for a lower-case phrase.

    >>> article("orange star"), article("big orange star")
    ('an', 'a')
    """
    return "an" if phrase[:1] in "aeiou" else "a"


@dataclass(frozen=True)
class Entity:
    """A named thing and its look. ``name`` has no article ("Kestrel-7 valve");
    captions say "the Kestrel-7 valve"."""

    name: str
    shape: str
    colour: str
    pattern: str
    pattern_colour: str
    mark: str
    cluster: int

    @property
    def look(self) -> tuple[str, str, str, str, str]:
        return (self.shape, self.colour, self.pattern, self.pattern_colour, self.mark)

    @property
    def explanation(self) -> str:
        body = f"{self.colour} {self.shape}"
        return f"{article(body)} {body} with {self.pattern_colour} {self.pattern} and {article(self.mark)} {self.mark}"

    def obj(self, x: int, y: int) -> Obj:
        """This entity drawn at (x, y). Entities are always big: a pattern
        needs room for a few periods to be seen at 64x64.

        >>> catalogue()[0].obj(32, 20).size
        'big'
        """
        return Obj(self.shape, self.colour, "big", x, y, self.pattern, self.pattern_colour, self.mark, self.name)


def contrast(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b])))


def _name(i: int) -> str:
    # Three formats, as product and model names come: "Kestrel-7 valve",
    # "Orrin pump", "Vasta-31 drone".
    word, noun = _WORDS[i], _NOUNS[(i * 5) % len(_NOUNS)]
    if i % 3 == 0:
        return f"{word}-{(i * 7) % 9 + 1} {noun}"
    if i % 3 == 1:
        return f"{word} {noun}"
    return f"{word}-{(i * 13) % 89 + 10} {noun}"


def _build() -> tuple[tuple[Entity, ...], frozenset[str]]:
    rng = np.random.default_rng(_CATALOGUE_SEED)
    colours = list(COLOURS)
    # Bodies: each colour on two or three shapes and each shape under three
    # or four colours, never a held-out combo, so most clusters have a sibling
    # of the same colour (for the "same colours, other shape" negative).
    colour_order = [str(c) for c in rng.permutation(colours)]
    used = {s: 0 for s in SHAPES}
    bodies: list[tuple[str, str]] = []
    for k in range(_N_CLUSTERS):
        c = colour_order[k % len(colours)]
        free = [str(s) for s in rng.permutation(SHAPES) if (c, s) not in HELD_OUT_COMBOS and (c, s) not in bodies]
        s = min(free, key=lambda x: used[x])  # least used shape; ties in the shuffled order
        used[s] += 1
        bodies.append((c, s))

    entities: list[Entity] = []
    names = [_name(int(i)) for i in rng.permutation(len(_WORDS))]
    for cluster, (colour, shape) in enumerate(bodies):
        pcs = [str(p) for p in colours
               if p != colour and contrast(p, colour) >= MIN_CONTRAST and (p, shape) not in HELD_OUT_COMBOS]
        for _ in range(100):
            pc0, pc1 = (str(p) for p in rng.permutation(pcs)[:2])
            p0, p1 = (str(p) for p in rng.permutation(PATTERNS)[:2])
            m0, m1 = (str(m) for m in rng.permutation(MARKS)[:2])
            # The base look and three variants, each one change away from it.
            looks = [(p0, pc0, m0), (p1, pc0, m0), (p0, pc1, m0), (p0, pc0, m1)]
            # No colour-swapped twin of an earlier entity: a black-rimmed
            # "orange cross with blue checks" would pass for a "blue cross
            # with orange checks".
            twins = {(shape, pc, colour, pat, mk) for pat, pc, mk in looks}
            if not any((e.shape, e.colour, e.pattern_colour, e.pattern, e.mark) in twins for e in entities):
                break
        else:
            raise RuntimeError(f"no twin-free looks for the {colour} {shape} cluster")
        for pattern, pc, mark in looks:
            entities.append(Entity(names[len(entities)], shape, colour, pattern, pc, mark, cluster))
    held = frozenset(entities[c * _PER_CLUSTER + int(rng.integers(_PER_CLUSTER))].name for c in range(_N_CLUSTERS))
    return tuple(entities), held


_CATALOGUE, HELD_OUT_ENTITIES = _build()
_BY_NAME = {e.name: e for e in _CATALOGUE}


def catalogue() -> tuple[Entity, ...]:
    """All entities, cluster by cluster.

    >>> len(catalogue()), len({e.look for e in catalogue()})
    (64, 64)
    """
    return _CATALOGUE


def get_entity(name: str) -> Entity:
    """The entity called ``name`` (without "the").

    >>> get_entity(catalogue()[5].name).cluster
    1
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no entity named {name!r}; names look like {_CATALOGUE[0].name!r}") from None


def lookalikes(name: str, allowed: frozenset[str] | set[str] | None = None, k: int = 4) -> list[str]:
    """Up to k look-alike names, hardest first: the cluster mates (same shape
    and body colour), then one entity of the same colours on another shape.
    ``allowed`` restricts the candidates (train leaves out held-out names).

    >>> e = catalogue()[0]
    >>> all(get_entity(n).cluster == e.cluster for n in lookalikes(e.name)[:3])
    True
    """
    e = get_entity(name)
    ok = (lambda n: n != name) if allowed is None else (lambda n: n != name and n in allowed)
    mates = [o.name for o in _CATALOGUE if o.cluster == e.cluster and ok(o.name)]
    # Same body colour, other shape; the same pattern colour first.
    others = sorted((o for o in _CATALOGUE if o.colour == e.colour and o.shape != e.shape and ok(o.name)),
                    key=lambda o: (o.pattern_colour != e.pattern_colour, o.pattern != e.pattern, o.name))
    return (mates + [o.name for o in others[:1]])[:k]


def knowledge_base() -> dict[str, str]:
    """Entity name -> explanation, for every entity (held-out ones included:
    the explanation is what lets a model match a name it never saw).

    >>> kb = knowledge_base(); len(kb)
    64
    """
    return {e.name: e.explanation for e in _CATALOGUE}


def write_knowledge_base(path: str | Path) -> Path:
    """Write ``knowledge_base()`` as one JSON object, name -> explanation.

    >>> import tempfile, os
    >>> p = write_knowledge_base(os.path.join(tempfile.mkdtemp(), "kb.json")); len(json.loads(p.read_text()))
    64
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(knowledge_base(), indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


# Entity names are the capitalised words of otherwise lower-case captions
# ("the Kestrel-7 valve").
NAME_PATTERN = re.compile(r"\b[A-Z][A-Za-z]*(?:-\d+)?")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def invented_name(rng: np.random.Generator) -> str:
    """A fresh name in the catalogue's style that no split ever uses ("Tazomi-4")."""
    word = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
    return f"{word}-{int(rng.integers(1, 10))}" if rng.random() < 0.5 else word


def rename_entities(text: str, names: dict[str, str], rng: np.random.Generator) -> str:
    """``text`` with every entity name swapped for an invented one, the same one for
    the same name across calls that share ``names``: a name the model never saw."""
    return NAME_PATTERN.sub(lambda m: names.setdefault(m.group(0), invented_name(rng)), text)
