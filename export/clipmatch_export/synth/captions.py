"""Captions, their logical forms and their hard negatives: one builder per phenomenon.

Each builder draws a scene and a caption that is true of it, then the hard
negatives: captions one edit away that are false of it (attributes swapped,
order swapped, relation flipped, negation dropped, a look-alike's name) and,
where one exists, a hard-negative image (the same scene with colours swapped,
positions swapped, the negated object added or a look-alike drawn instead).
A negative caption reuses the positive's template, so the words that differ
are exactly the ones that carry the phenomenon.

``compose`` checks every draft with ``forms.satisfies`` (positive true,
negatives false, the negative image true of the first negative and false of
the positive) and with the split's rules, and draws again when a check fails.

Phenomena and what plain cosine gets wrong on them:
- basic: "a red circle". The control.
- binding: "a red circle and a blue square" vs "a blue circle and a red square".
- spatial: "a red circle left of a blue square" vs "a blue square left of a red circle".
- negation: "a red circle and no square" vs "a red circle and a square".
- entity: "the Kestrel-7 valve" vs the name of a look-alike.
- look: "a blue circle with yellow stripes and a white dot" vs one detail
  changed. Entity explanations are said in these words; without this
  phenomenon the towers only ever see the seen entities' few looks and learn
  them as whole strings, so an unseen entity's explanation matches nothing.

    >>> import numpy as np
    >>> d = compose("binding", np.random.default_rng(0), SplitRules(ALL_COMBOS, ()))
    >>> satisfies(d.scene, d.form), [satisfies(d.scene, f) for f in d.negative_forms]
    (True, [False, False])
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from clipmatch_export.synth.entities import MIN_CONTRAST, article, catalogue, contrast, get_entity, lookalikes
from clipmatch_export.synth.forms import And, EntityIs, Form, Has, Not, Rel, mentions, satisfies
from clipmatch_export.synth.world import (
    COLOURS,
    MARKS,
    PATTERNS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    place_line,
    place_single,
    random_background,
)

__all__ = [
    "PHENOMENA", "FUNCTIONAL_WORDS", "ALL_COMBOS", "SplitRules", "Draft", "compose", "noun_phrase",
    "BASIC_TEMPLATES", "BINDING_TEMPLATES", "SPATIAL_TEMPLATES", "NEGATION_TEMPLATES", "ENTITY_TEMPLATES",
]

PHENOMENA = ("basic", "binding", "spatial", "negation", "entity", "look")
# The words the DCSM scorer gives a learned column of their own; every one of
# them is used in these captions with its real meaning.
FUNCTIONAL_WORDS = ("above", "below", "left", "right", "small", "big", "not", "no", "without", "but", "absent")
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

# {A}, {B}: noun phrase with its article ("a red circle"); {b}: without ("square").
BASIC_TEMPLATES = ("{A}", "a photo of {A}", "there is {A}", "an image of {A}")
BINDING_TEMPLATES = ("{A} and {B}", "a photo of {A} and {B}", "there is {A} and {B}", "an image with {A} and {B}")
# Same length per relation: a flipped-relation negative keeps the template index.
SPATIAL_TEMPLATES = {
    "left": ("{A} left of {B}", "{A} to the left of {B}", "a photo of {A} left of {B}", "{A} is left of {B}"),
    "right": ("{A} right of {B}", "{A} to the right of {B}", "a photo of {A} right of {B}", "{A} is right of {B}"),
    "above": ("{A} above {B}", "{A} is above {B}", "a photo of {A} above {B}", "there is {A} above {B}"),
    "below": ("{A} below {B}", "{A} is below {B}", "a photo of {A} below {B}", "there is {A} below {B}"),
}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# (negated template, the same sentence with the negation dropped)
NEGATION_TEMPLATES = (
    ("{A} and no {b}", "{A} and {B}"),
    ("{A} without {B}", "{A} with {B}"),
    ("{A} but not {B}", "{A} and {B}"),
    ("{A} but no {b}", "{A} and {B}"),
    ("{A}, {B} is absent", "{A}, {B} is present"),
    ("there is {A} and no {b}", "there is {A} and {B}"),
)
LOOK_TEMPLATES = ("{A}", "a photo of {A}", "there is {A}", "an image of {A}")
ENTITY_TEMPLATES = ("the {n}", "a photo of the {n}", "a picture of the {n}", "there is the {n}")


@dataclass(frozen=True)
class SplitRules:
    """What a split may draw and name.

    combos: the (colour, shape) pairs objects may have and captions may name.
    entities: the entity names that may appear, drawn or named.
    focus_combos / focus_entities: what test favours (the held-out ones);
    a basic or binding example uses a focus combo, an entity example a focus
    entity, with probability focus_rate.
    """

    combos: tuple[tuple[str, str], ...]
    entities: tuple[str, ...]
    focus_combos: tuple[tuple[str, str], ...] = ()
    focus_entities: tuple[str, ...] = ()
    focus_rate: float = 0.5


@dataclass
class Draft:
    """A caption, its scene and its hard negatives, before the dataset numbers it.

    negative_forms[i] is the form of negative_captions[i]; negative_scene, when
    present, makes negative_captions[0] true and the caption false.
    """

    phenomenon: str
    scene: Scene
    caption: str
    form: Form
    negative_captions: list[str]
    negative_forms: list[Form]
    negative_scene: Scene | None
    entity: str | None = None
    explanation: str | None = None


class _Reject(Exception):
    """This draw does not work out (layout does not fit, no partner left): draw again."""


def noun_phrase(h: Has, with_article: bool = True) -> str:
    """The words for a ``Has``: size, colour, shape, optionally after "a"/"an".

    >>> noun_phrase(Has("orange", "star")), noun_phrase(Has(shape="square"), with_article=False)
    ('an orange star', 'square')
    >>> noun_phrase(Has("blue", "circle", pattern="stripes", pattern_colour="yellow", mark="white dot"))
    'a blue circle with yellow stripes and a white dot'
    """
    words = " ".join(w for w in (h.size, h.colour, h.shape) if w is not None)
    if h.pattern is not None:
        words += f" with {h.pattern_colour} {h.pattern}"
    if h.mark is not None:
        words += f" {'and' if h.pattern is not None else 'with'} {article(h.mark)} {h.mark}"
    return f"{article(words)} {words}" if with_article else words


# --- sampling helpers ----------------------------------------------------------

def _choice(rng: np.random.Generator, seq):
    if not seq:
        raise _Reject("nothing to choose from")
    return seq[int(rng.integers(len(seq)))]


def _pick_combo(rng: np.random.Generator, rules: SplitRules, focus: bool = False) -> tuple[str, str]:
    # focus is decided by one draw whatever the rules, so train and test
    # consume their random streams alike.
    take_focus = rng.random() < rules.focus_rate
    if focus and take_focus and rules.focus_combos:
        return _choice(rng, rules.focus_combos)
    return _choice(rng, rules.combos)


def _size(rng: np.random.Generator) -> str:
    return SIZES[int(rng.integers(len(SIZES)))]


def _axis(rng: np.random.Generator) -> str:
    return "horizontal" if rng.random() < 0.5 else "vertical"


def _scene_bits(rng: np.random.Generator) -> tuple[tuple[int, int, int], int]:
    return random_background(rng), int(rng.integers(2**32))


def _line(rng: np.random.Generator, sizes: list[str], axis: str) -> list[tuple[int, int]]:
    xy = place_line(rng, sizes, axis)
    if xy is None:
        raise _Reject(f"{sizes} do not fit on one line")
    return xy


def _swap_on_line(a: Obj, b: Obj) -> tuple[Obj, Obj]:
    # Swap two objects on a line while keeping the span they cover, so both
    # still fit whatever their sizes; the centre distance is unchanged.
    horizontal = abs(a.x - b.x) >= abs(a.y - b.y)
    pa, pb = (a.x, b.x) if horizontal else (a.y, b.y)
    first, second = (a, b) if pa < pb else (b, a)
    lo = min(pa, pb) - first.radius
    hi = max(pa, pb) + second.radius
    new_second_pos, new_first_pos = lo + second.radius, hi - first.radius  # second moves to the front
    if horizontal:
        f2 = replace(first, x=new_first_pos, y=second.y)
        s2 = replace(second, x=new_second_pos, y=first.y)
    else:
        f2 = replace(first, y=new_first_pos, x=second.x)
        s2 = replace(second, y=new_second_pos, x=first.x)
    return (f2, s2) if first is a else (s2, f2)


# --- builders --------------------------------------------------------------------

def _basic(rng: np.random.Generator, rules: SplitRules) -> Draft:
    colour, shape = _pick_combo(rng, rules, focus=True)
    size = _size(rng)
    x, y = place_single(rng, size)
    bg, seed = _scene_bits(rng)
    obj = Obj(shape, colour, size, x, y)
    h = Has(colour, shape, size if rng.random() < 0.3 else None)
    t = BASIC_TEMPLATES[int(rng.integers(len(BASIC_TEMPLATES)))]
    # One attribute changed at a time, to a combination the split allows.
    other_colour = _choice(rng, [c for c, s in rules.combos if s == shape and c != colour])
    other_shape = _choice(rng, [s for c, s in rules.combos if c == colour and s != shape])
    negs = [replace(h, colour=other_colour), replace(h, shape=other_shape)]
    if h.size is not None:
        negs.append(replace(h, size="big" if size == "small" else "small"))
    say = lambda f: t.format(A=noun_phrase(f))  # noqa: E731
    return Draft("basic", Scene((obj,), bg, seed), say(h), h, [say(f) for f in negs], negs,
                 Scene((replace(obj, colour=other_colour),), bg, seed))


def _binding(rng: np.random.Generator, rules: SplitRules) -> Draft:
    ca, sa = _pick_combo(rng, rules, focus=True)
    allowed = set(rules.combos)
    # B differs in both colour and shape, and the swapped pairs are allowed too
    # (train must never name a held-out pair, even in a negative).
    cb, sb = _choice(rng, [(c, s) for c, s in rules.combos
                           if c != ca and s != sa and (c, sa) in allowed and (ca, s) in allowed])
    za, zb = _size(rng), _size(rng)
    say_size = rng.random() < 0.3
    ha = Has(ca, sa, za if say_size else None)
    hb = Has(cb, sb, zb if say_size else None)
    axis = _axis(rng)
    a_first = rng.random() < 0.5
    xy = _line(rng, [za, zb] if a_first else [zb, za], axis)
    (xa, ya), (xb, yb) = xy if a_first else xy[::-1]
    bg, seed = _scene_bits(rng)
    oa, ob = Obj(sa, ca, za, xa, ya), Obj(sb, cb, zb, xb, yb)
    t = BINDING_TEMPLATES[int(rng.integers(len(BINDING_TEMPLATES)))]
    negs = [
        And((replace(ha, colour=cb), replace(hb, colour=ca))),  # colours swapped
        And((replace(ha, shape=sb), replace(hb, shape=sa))),  # shapes swapped
    ]
    if say_size and za != zb:
        negs.append(And((replace(ha, size=zb), replace(hb, size=za))))  # sizes swapped
    say = lambda f: t.format(A=noun_phrase(f.args[0]), B=noun_phrase(f.args[1]))  # noqa: E731
    form = And((ha, hb))
    neg_scene = Scene((replace(oa, colour=cb), replace(ob, colour=ca)), bg, seed)
    return Draft("binding", Scene((oa, ob), bg, seed), say(form), form, [say(f) for f in negs], negs, neg_scene)


def _spatial(rng: np.random.Generator, rules: SplitRules) -> Draft:
    ca, sa = _pick_combo(rng, rules)
    cb, sb = _choice(rng, [(c, s) for c, s in rules.combos if (c, s) != (ca, sa)])
    za, zb = _size(rng), _size(rng)
    say_size = rng.random() < 0.2
    ha = Has(ca, sa, za if say_size else None)
    hb = Has(cb, sb, zb if say_size else None)
    rel = ("left", "right", "above", "below")[int(rng.integers(4))]
    axis = "horizontal" if rel in ("left", "right") else "vertical"
    a_first = rel in ("left", "above")  # "first" = leftmost or topmost
    xy = _line(rng, [za, zb] if a_first else [zb, za], axis)
    (xa, ya), (xb, yb) = xy if a_first else xy[::-1]
    bg, seed = _scene_bits(rng)
    oa, ob = Obj(sa, ca, za, xa, ya), Obj(sb, cb, zb, xb, yb)
    ti = int(rng.integers(len(SPATIAL_TEMPLATES[rel])))
    form = Rel(ha, rel, hb)
    negs = [Rel(hb, rel, ha), Rel(ha, _OPPOSITE[rel], hb)]  # order swapped, relation flipped
    say = lambda f: SPATIAL_TEMPLATES[f.rel][ti].format(A=noun_phrase(f.a), B=noun_phrase(f.b))  # noqa: E731
    neg_scene = Scene(_swap_on_line(oa, ob), bg, seed)
    return Draft("spatial", Scene((oa, ob), bg, seed), say(form), form, [say(f) for f in negs], negs, neg_scene)


def _negation(rng: np.random.Generator, rules: SplitRules) -> Draft:
    ca, sa = _pick_combo(rng, rules)
    ha = Has(ca, sa)
    if rng.random() < 0.5:
        # Only the shape is negated: "a red circle and no square".
        sb = _choice(rng, [s for s in SHAPES if s != sa])
        hb = Has(shape=sb)
        cb = _choice(rng, [c for c, s in rules.combos if s == sb])  # the colour it has when added
    else:
        cb, sb = _choice(rng, [(c, s) for c, s in rules.combos if (c, s) != (ca, sa)])
        hb = Has(cb, sb)
    objs = [("a", ca, sa)]
    if rng.random() < 0.5:
        # A distractor that must not be B; often a near miss (B's colour on
        # another shape, or B's shape in another colour) when B has a colour.
        near = [(c, s) for c, s in rules.combos
                if (c, s) != (ca, sa) and not (s == sb and (hb.colour is None or c == cb))
                and (hb.colour is not None and (c == cb or s == sb))]
        far = [(c, s) for c, s in rules.combos if (c, s) != (ca, sa) and s != sb]
        cd, sd = _choice(rng, near) if near and rng.random() < 0.6 else _choice(rng, far)
        objs.append(("d", cd, sd))
    objs.append(("b", cb, sb))
    order = [objs[i] for i in rng.permutation(len(objs))]
    sizes = [_size(rng) for _ in order]
    xy = _line(rng, sizes, _axis(rng))
    bg, seed = _scene_bits(rng)
    placed = [(role, Obj(s, c, z, x, y)) for (role, c, s), z, (x, y) in zip(order, sizes, xy)]
    kept = tuple(o for role, o in placed if role != "b")
    pos_t, flip_t = NEGATION_TEMPLATES[int(rng.integers(len(NEGATION_TEMPLATES)))]
    form = And((ha, Not(hb)))
    negs = [And((ha, hb)), And((hb, Not(ha)))]  # negation dropped; roles swapped
    captions = [
        pos_t.format(A=noun_phrase(ha), B=noun_phrase(hb), b=noun_phrase(hb, False)),
        flip_t.format(A=noun_phrase(ha), B=noun_phrase(hb)),
        pos_t.format(A=noun_phrase(hb), B=noun_phrase(ha), b=noun_phrase(ha, False)),
    ]
    # The hard-negative image adds B in the slot kept free for it.
    neg_scene = Scene(tuple(o for _, o in placed), bg, seed)
    return Draft("negation", Scene(kept, bg, seed), captions[0], form, captions[1:], negs, neg_scene)


def _big_object_scene(rng: np.random.Generator, rules: SplitRules) -> tuple[int, int, Callable[[Obj], Scene]]:
    """Where a big object (an entity, a patterned look) goes, alone or beside one plain
    object on a line; and a function that draws the scene with a given big object there."""
    bg, seed = _scene_bits(rng)
    if rng.random() < 0.5:
        x, y = place_single(rng, "big")
        others: tuple[Obj, ...] = ()
        slot = 0
    else:
        cd, sd = _choice(rng, rules.combos)
        zd = _size(rng)
        first = rng.random() < 0.5
        xy = _line(rng, ["big", zd] if first else [zd, "big"], _axis(rng))
        (x, y), (xd, yd) = xy if first else xy[::-1]
        others = (Obj(sd, cd, zd, xd, yd),)
        slot = 0 if first else 1

    def scene_with(big: Obj) -> Scene:
        objs = list(others)
        objs.insert(slot, big)
        return Scene(tuple(objs), bg, seed)

    return x, y, scene_with


def _entity(rng: np.random.Generator, rules: SplitRules) -> Draft:
    take_focus = rng.random() < rules.focus_rate
    name = _choice(rng, rules.focus_entities if take_focus and rules.focus_entities else rules.entities)
    e = get_entity(name)
    x, y, scene_with = _big_object_scene(rng, rules)
    names = lookalikes(name, allowed=set(rules.entities))
    if not names:
        raise _Reject(f"no look-alike of {name!r} allowed")
    t = ENTITY_TEMPLATES[int(rng.integers(len(ENTITY_TEMPLATES)))]
    return Draft("entity", scene_with(e.obj(x, y)), t.format(n=name), EntityIs(name),
                 [t.format(n=n) for n in names], [EntityIs(n) for n in names],
                 scene_with(get_entity(names[0]).obj(x, y)), entity=name, explanation=e.explanation)


def _look(rng: np.random.Generator, rules: SplitRules) -> Draft:
    colour, shape = _pick_combo(rng, rules)
    pattern = _choice(rng, PATTERNS)
    readable = [c for c in COLOURS
                if c != colour and contrast(c, colour) >= MIN_CONTRAST and (c, shape) in rules.combos]
    pc = _choice(rng, readable)
    mark = _choice(rng, MARKS)
    h = Has(colour, shape, pattern=pattern, pattern_colour=pc, mark=mark)
    x, y, scene_with = _big_object_scene(rng, rules)
    # One detail changed per negative; the first one is also drawn as the negative image.
    negs = [replace(h, pattern=_choice(rng, [p for p in PATTERNS if p != pattern])),
            replace(h, pattern_colour=_choice(rng, [c for c in readable if c != pc])),
            replace(h, mark=_choice(rng, [m for m in MARKS if m != mark]))]
    order = rng.permutation(len(negs))
    negs = [negs[int(i)] for i in order]
    t = LOOK_TEMPLATES[int(rng.integers(len(LOOK_TEMPLATES)))]
    say = lambda f: t.format(A=noun_phrase(f))  # noqa: E731
    drawn = lambda a: scene_with(Obj(shape, colour, "big", x, y, a.pattern, a.pattern_colour, a.mark))  # noqa: E731
    return Draft("look", drawn(h), say(h), h, [say(f) for f in negs], negs, drawn(negs[0]))


_BUILDERS: dict[str, Callable[[np.random.Generator, SplitRules], Draft]] = {
    "basic": _basic, "binding": _binding, "spatial": _spatial, "negation": _negation, "entity": _entity,
    "look": _look,
}


def _problem(d: Draft, rules: SplitRules) -> str | None:
    # Why a draft cannot be used, or None. Truth first, then the split's rules.
    if not satisfies(d.scene, d.form):
        return "caption false of its scene"
    for c, f in zip(d.negative_captions, d.negative_forms):
        if satisfies(d.scene, f):
            return f"negative {c!r} true of the scene"
    if d.negative_scene is not None:
        if not satisfies(d.negative_scene, d.negative_forms[0]):
            return "negative scene does not show the first negative"
        if satisfies(d.negative_scene, d.form):
            return "caption true of the negative scene"
    if len(set([d.caption, *d.negative_captions])) != 1 + len(d.negative_captions):
        return "repeated caption"
    combos, names = set(rules.combos), set(rules.entities)
    for f in (d.form, *d.negative_forms):
        fc, fn = mentions(f)
        if not fc <= combos or not fn <= names:
            return "names something the split holds out"
    held_looks = {e.look for e in catalogue() if e.name not in names}
    for s in (d.scene, d.negative_scene):
        for o in (s.objects if s is not None else ()):
            if o.combo not in combos or (o.entity is not None and o.entity not in names):
                return "draws something the split holds out"
            if (o.shape, o.colour, o.pattern, o.pattern_colour, o.mark) in held_looks and o.entity is None:
                return "draws the look of an entity the split holds out"
    return None


def compose(phenomenon: str, rng: np.random.Generator, rules: SplitRules, max_tries: int = 200) -> Draft:
    """Draw one checked example of a phenomenon under a split's rules.

    >>> d = compose("negation", np.random.default_rng(1), SplitRules(ALL_COMBOS, ()))
    >>> d.phenomenon, satisfies(d.negative_scene, d.negative_forms[0])
    ('negation', True)
    """
    if phenomenon not in _BUILDERS:
        raise ValueError(f"phenomenon {phenomenon!r} is not one of {PHENOMENA}")
    last = "no draw"
    for _ in range(max_tries):
        try:
            d = _BUILDERS[phenomenon](rng, rules)
        except _Reject as exc:
            last = str(exc)
            continue
        last = _problem(d, rules)
        if last is None:
            return d
    raise RuntimeError(f"no valid {phenomenon!r} example in {max_tries} draws; last problem: {last}")
