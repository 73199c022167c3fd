"""Logical forms: what a caption claims, in a form any scene can be checked against.

A caption's form is a small tree: ``Has`` (some object has this colour, shape
and size), ``EntityIs`` (some object looks like this entity), ``Rel`` (two
distinct objects stand in a relation), ``Not`` and ``And``. ``satisfies``
decides it on any scene, so retrieval over a gallery can count every image a
caption is true of, not only the one it was written for.

Semantics worth knowing:
- ``Has`` checks only the attributes it names: an entity that is a blue
  circle with yellow stripes is "a blue circle" too (its explanation says so).
- ``EntityIs`` compares the whole look (shape, colour, pattern, pattern
  colour, mark), never the name stored on the object.
- Relations are strict (``world.relation``): a diagonal pair is in none.

    >>> from .world import Obj, Scene
    >>> s = Scene((Obj("circle", "red", "big", 15, 30), Obj("square", "blue", "small", 45, 31)), (230,) * 3, 0)
    >>> satisfies(s, Rel(Has("red", "circle"), "left", Has("blue", "square")))
    True
    >>> satisfies(s, And((Has("red", "circle"), Not(Has(shape="square")))))
    False
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from clipmatch_export.synth.entities import get_entity
from clipmatch_export.synth.world import Obj, Scene, holds

__all__ = [
    "Has", "EntityIs", "Rel", "Not", "And", "Form",
    "satisfies", "form_to_json", "form_from_json", "mentions",
]


@dataclass(frozen=True)
class Has:
    """Some object has these attributes; None means "any"."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    pattern: str | None = None
    pattern_colour: str | None = None
    mark: str | None = None


@dataclass(frozen=True)
class EntityIs:
    """Some object looks like the named entity."""

    name: str


@dataclass(frozen=True)
class Rel:
    """Two distinct objects, one matching ``a`` and one matching ``b``, with "a <rel> b"."""

    a: Has | EntityIs
    rel: str
    b: Has | EntityIs


@dataclass(frozen=True)
class Not:
    arg: Form


@dataclass(frozen=True)
class And:
    args: tuple[Form, ...]


Form = Union[Has, EntityIs, Rel, Not, And]  # noqa: UP007 (an alias evaluated at import, on Python 3.10 too)
_LOOK = ("pattern", "pattern_colour", "mark")


def _matches(o: Obj, atom: Has | EntityIs) -> bool:
    if isinstance(atom, EntityIs):
        e = get_entity(atom.name)
        return (o.shape, o.colour, o.pattern, o.pattern_colour, o.mark) == e.look
    return ((atom.colour is None or o.colour == atom.colour)
            and (atom.shape is None or o.shape == atom.shape)
            and (atom.size is None or o.size == atom.size)
            and (atom.pattern is None or o.pattern == atom.pattern)
            and (atom.pattern_colour is None or o.pattern_colour == atom.pattern_colour)
            and (atom.mark is None or o.mark == atom.mark))


def satisfies(scene: Scene, form: Form) -> bool:
    """Whether the scene makes the form true.

    >>> from .world import Obj, Scene
    >>> satisfies(Scene((Obj("star", "red", "small", 20, 20),), (230,) * 3, 0), Has("red", size="big"))
    False
    """
    objs = scene.objects
    if isinstance(form, (Has, EntityIs)):
        return any(_matches(o, form) for o in objs)
    if isinstance(form, Rel):
        return any(_matches(a, form.a) and _matches(b, form.b) and holds(a, form.rel, b)
                   for i, a in enumerate(objs) for j, b in enumerate(objs) if i != j)
    if isinstance(form, Not):
        return not satisfies(scene, form.arg)
    if isinstance(form, And):
        return all(satisfies(scene, f) for f in form.args)
    raise TypeError(f"not a logical form: {form!r}")


def form_to_json(form: Form) -> dict:
    """The form as plain JSON types, tagged by "op".

    >>> form_to_json(Not(Has(shape="square")))
    {'op': 'not', 'arg': {'op': 'has', 'colour': None, 'shape': 'square', 'size': None}}
    """
    if isinstance(form, Has):
        d = {"op": "has", "colour": form.colour, "shape": form.shape, "size": form.size}
        # Look attributes only where named, so plain forms keep their short JSON.
        d.update({k: getattr(form, k) for k in _LOOK if getattr(form, k) is not None})
        return d
    if isinstance(form, EntityIs):
        return {"op": "entity", "name": form.name}
    if isinstance(form, Rel):
        return {"op": "rel", "a": form_to_json(form.a), "rel": form.rel, "b": form_to_json(form.b)}
    if isinstance(form, Not):
        return {"op": "not", "arg": form_to_json(form.arg)}
    if isinstance(form, And):
        return {"op": "and", "args": [form_to_json(f) for f in form.args]}
    raise TypeError(f"not a logical form: {form!r}")


def form_from_json(d: dict) -> Form:
    """Inverse of ``form_to_json``.

    >>> f = Rel(Has("red", "circle"), "above", EntityIs("Orrin pump"))
    >>> form_from_json(form_to_json(f)) == f
    True
    """
    op = d.get("op")
    if op == "has":
        return Has(d["colour"], d["shape"], d["size"], *(d.get(k) for k in _LOOK))
    if op == "entity":
        return EntityIs(d["name"])
    if op == "rel":
        return Rel(form_from_json(d["a"]), d["rel"], form_from_json(d["b"]))
    if op == "not":
        return Not(form_from_json(d["arg"]))
    if op == "and":
        return And(tuple(form_from_json(f) for f in d["args"]))
    raise ValueError(f"unknown form op {op!r} in {d!r}")


def mentions(form: Form) -> tuple[set[tuple[str, str]], set[str]]:
    """The (colour, shape) pairs and entity names a form names, negated or not.

    >>> mentions(And((Has("red", "circle"), Not(Has(shape="star")), EntityIs("Orrin pump"))))
    ({('red', 'circle')}, {'Orrin pump'})
    """
    combos: set[tuple[str, str]] = set()
    names: set[str] = set()

    def walk(f: Form) -> None:
        if isinstance(f, Has):
            if f.colour is not None and f.shape is not None:
                combos.add((f.colour, f.shape))
        elif isinstance(f, EntityIs):
            names.add(f.name)
        elif isinstance(f, Rel):
            walk(f.a)
            walk(f.b)
        elif isinstance(f, Not):
            walk(f.arg)
        elif isinstance(f, And):
            for g in f.args:
                walk(g)
        else:
            raise TypeError(f"not a logical form: {f!r}")

    walk(form)
    return combos, names
