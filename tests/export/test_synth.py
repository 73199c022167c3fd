"""The synthetic world: deterministic, truthful captions and hard negatives, clean
held-out sets, unambiguous relations, and a dataset writer that survives a kill."""
from __future__ import annotations

import doctest
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipmatch_export import synth
from clipmatch_export.synth import (
    COLOURS,
    FUNCTIONAL_WORDS,
    HELD_OUT_COMBOS,
    HELD_OUT_ENTITIES,
    MARKS,
    PATTERNS,
    PHENOMENA,
    SHAPES,
    EntityIs,
    captions,
    catalogue,
    dataset,
    entities,
    form_from_json,
    forms,
    get_entity,
    knowledge_base,
    make_examples,
    read_records,
    relation,
    render,
    satisfies,
    scene_from_json,
    tokenizer_corpus,
    world,
    write_dataset,
)

EXPORT = Path(__file__).resolve().parents[2] / "export"


@pytest.fixture(scope="module")
def train():
    return make_examples("train", 3000, seed=0)


@pytest.fixture(scope="module")
def val():
    return make_examples("val", 1000, seed=0)


@pytest.fixture(scope="module")
def tst_examples():
    return make_examples("test", 1500, seed=0)


def _texts(ex):
    return [ex.caption, *ex.negative_captions] + ([ex.explanation] if ex.explanation else [])


# --- determinism ---------------------------------------------------------------

def test_same_seed_same_bytes_and_captions():
    a, b = make_examples("train", 40, seed=5), make_examples("train", 40, seed=5)
    assert [e.caption for e in a] == [e.caption for e in b]
    assert [e.negative_captions for e in a] == [e.negative_captions for e in b]
    for x, y in zip(a, b):
        assert np.array_equal(render(x.scene), render(y.scene))
        if x.negative_scene is not None:
            assert np.array_equal(render(x.negative_scene), render(y.negative_scene))


def test_lists_are_prefix_stable_and_seeds_differ():
    short, long = make_examples("val", 20, seed=1), make_examples("val", 45, seed=1)
    assert [e.caption for e in short] == [e.caption for e in long[:20]]
    assert [e.scene for e in make_examples("val", 20, seed=1)] != [e.scene for e in make_examples("val", 20, seed=2)]


def test_different_splits_do_not_share_images():
    seen = {render(e.scene).tobytes() for e in make_examples("train", 200, seed=0)}
    for split in ("val", "test"):
        assert not seen & {render(e.scene).tobytes() for e in make_examples(split, 200, seed=0)}


def test_negative_image_differs_only_where_the_objects_do():
    for ex in make_examples("train", 100, seed=3):
        pos, neg = render(ex.scene).astype(int), render(ex.negative_scene).astype(int)
        changed = np.abs(pos - neg).sum(-1) > 0  # (64, 64)
        assert changed.any(), ex.caption
        # Outside every object box (either scene) the two images are identical:
        # same seed, same background, clutter and noise.
        boxes = np.zeros((64, 64), bool)
        for o in ex.scene.objects + ex.negative_scene.objects:
            boxes[o.y - o.radius:o.y + o.radius + 1, o.x - o.radius:o.x + o.radius + 1] = True
        assert not (changed & ~boxes).any(), ex.caption


# --- truth of captions -----------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_positives_true_negatives_false(split, train, val, tst_examples):
    examples = {"train": train, "val": val, "test": tst_examples}[split]
    for ex in examples:
        assert satisfies(ex.scene, ex.form), ex.caption
        assert 1 <= len(ex.negative_captions) == len(ex.negative_forms) <= 4, ex.caption
        assert len(ex.negative_captions) <= 3 or ex.phenomenon == "entity"
        for cap, f in zip(ex.negative_captions, ex.negative_forms):
            assert not satisfies(ex.scene, f), (ex.caption, cap)
            assert cap != ex.caption
        assert ex.negative_scene is not None
        assert satisfies(ex.negative_scene, ex.negative_forms[0]), (ex.caption, ex.negative_captions[0])
        assert not satisfies(ex.negative_scene, ex.form), ex.caption
        assert (ex.explanation is not None) == (ex.phenomenon == "entity") == (ex.entity is not None)


def test_captions_say_what_the_form_says(train):
    # Every colour, shape and size a form names is a word of its caption, and
    # the negation/relation words are there too.
    for ex in train[:800]:
        words = set(ex.caption.replace(",", "").split())
        for cap, f in [(ex.caption, ex.form), *zip(ex.negative_captions, ex.negative_forms)]:
            ws = set(cap.replace(",", "").split())
            for h in _atoms(f):
                if isinstance(h, EntityIs):
                    assert f"the {h.name}" in cap
                else:
                    assert {w for w in (h.colour, h.shape, h.size) if w} <= ws, (cap, f)
        if ex.phenomenon == "negation":
            assert words & {"no", "not", "without", "absent"}, ex.caption
        if ex.phenomenon == "spatial":
            assert words & {"left", "right", "above", "below"}, ex.caption


def _atoms(f):
    if isinstance(f, (forms.Has, forms.EntityIs)):
        return [f]
    if isinstance(f, forms.Rel):
        return [f.a, f.b]
    if isinstance(f, forms.Not):
        return _atoms(f.arg)
    return [a for g in f.args for a in _atoms(g)]


def test_phrasings_and_functional_words(train):
    by_phenomenon: dict[str, set[str]] = {}
    for ex in train:
        # The template is what is left after the noun phrases are blanked out.
        t = ex.caption
        for h in _atoms(ex.form):
            if isinstance(h, EntityIs):
                t = t.replace(f"the {h.name}", "X")
            else:
                t = t.replace(captions.noun_phrase(h), "X").replace(captions.noun_phrase(h, False), "Y")
        by_phenomenon.setdefault(ex.phenomenon, set()).add(t)
    for p in PHENOMENA:
        assert len(by_phenomenon[p]) >= 3, (p, by_phenomenon[p])
    words = {w for ex in train for s in _texts(ex) for w in s.replace(",", "").split()}
    assert set(FUNCTIONAL_WORDS) <= words, set(FUNCTIONAL_WORDS) - words


def test_mixture_is_exact_per_block(train):
    counts = Counter(ex.phenomenon for ex in train)
    assert counts == {"basic": 600, "binding": 600, "spatial": 600, "negation": 450, "entity": 300, "look": 450}
    only = make_examples("train", 30, seed=0, phenomena=("spatial", "negation"))
    assert {e.phenomenon for e in only} == {"spatial", "negation"}


def test_forms_round_trip_through_json(train):
    for ex in train[:300]:
        assert form_from_json(json.loads(json.dumps(forms.form_to_json(ex.form)))) == ex.form
        assert scene_from_json(json.loads(json.dumps(world.scene_to_json(ex.scene)))) == ex.scene


# --- geometry --------------------------------------------------------------------

def test_spatial_relations_are_unambiguous(train, tst_examples):
    for ex in train + tst_examples:
        objs = ex.scene.objects
        # Every pair in every scene (negatives too) is on one line: one clear relation.
        for s in (ex.scene, ex.negative_scene):
            for a, b in itertools.combinations(s.objects, 2):
                assert relation(a, b) is not None, (ex.caption, a, b)
        if ex.phenomenon != "spatial":
            continue
        f = ex.form
        a = next(o for o in objs if forms._matches(o, f.a))
        b = next(o for o in objs if forms._matches(o, f.b))
        along, across = (b.x - a.x, b.y - a.y) if f.rel in ("left", "right") else (b.y - a.y, b.x - a.x)
        assert abs(along) >= 12 and abs(across) <= 4, ex.caption
        assert (along > 0) == (f.rel in ("left", "above")), ex.caption
        assert relation(a, b) == f.rel and relation(b, a) != f.rel


def test_objects_fit_and_do_not_overlap(train):
    for ex in train:
        for o in ex.scene.objects:
            assert o.radius <= o.x <= 63 - o.radius and o.radius <= o.y <= 63 - o.radius
        # Scene.__post_init__ refuses overlaps; building these proves none.
        assert 1 <= len(ex.scene.objects) <= 3


# --- held-out sets ---------------------------------------------------------------

def _mentions_combo(text: str, combos) -> bool:
    return any(f"{c} {s}" in text for c, s in combos)


def test_held_out_combos_and_entities_never_in_train_or_val(train, val):
    assert len(HELD_OUT_COMBOS) >= 4 and len(HELD_OUT_ENTITIES) >= 12
    names = [n.lower() for n in HELD_OUT_ENTITIES]
    for ex in train + val:
        assert not ex.held_out
        for text in _texts(ex):
            assert not _mentions_combo(text, HELD_OUT_COMBOS), text
            assert not any(n in text.lower() for n in names), text
        for s in (ex.scene, ex.negative_scene):
            for o in s.objects:
                assert o.combo not in HELD_OUT_COMBOS and o.entity not in HELD_OUT_ENTITIES
                if o.pattern_colour is not None:
                    assert (o.pattern_colour, o.shape) not in HELD_OUT_COMBOS


def test_held_out_sets_appear_in_test(tst_examples):
    combos_seen = {c for ex in tst_examples if ex.phenomenon in ("basic", "binding")
                   for c in HELD_OUT_COMBOS if f"{c[0]} {c[1]}" in ex.caption}
    assert combos_seen == set(HELD_OUT_COMBOS)
    assert {ex.entity for ex in tst_examples} >= set(HELD_OUT_ENTITIES)
    assert sum(ex.held_out for ex in tst_examples) > len(tst_examples) // 10


def test_held_out_entity_words_are_seen_in_training():
    corpus = tokenizer_corpus(600, seed=0)
    assert not any(n.lower() in s.lower() for s in corpus for n in HELD_OUT_ENTITIES)
    seen = {w for s in corpus for w in s.split()}
    for name in HELD_OUT_ENTITIES:
        look_words = set(knowledge_base()[name].replace(f"the {name} is ", "").split())
        assert look_words <= seen, look_words - seen


# --- entities --------------------------------------------------------------------

def test_catalogue_looks_unique_and_clustered():
    cat = catalogue()
    assert len(cat) >= 48
    assert len({e.look for e in cat}) == len(cat)
    assert len({e.name for e in cat}) == len(cat)
    for a, b in itertools.permutations([e.name.lower() for e in cat], 2):
        assert a not in b
    for e in cat:
        assert (e.colour, e.shape) not in HELD_OUT_COMBOS
        assert e.pattern in PATTERNS and e.mark in MARKS and e.pattern_colour != e.colour
        assert re.search(r"\d|\b[A-Z]", e.name)
        # No colour-swapped twin: it would render nearly the same.
        assert not any((o.shape, o.pattern, o.mark, o.colour, o.pattern_colour)
                       == (e.shape, e.pattern, e.mark, e.pattern_colour, e.colour) for o in cat)
    clusters = Counter(e.cluster for e in cat)
    assert set(clusters.values()) == {4}
    assert Counter(get_entity(n).cluster for n in HELD_OUT_ENTITIES) == Counter({c: 1 for c in clusters})


def test_lookalikes_are_hard(train):
    for ex in train:
        if ex.phenomenon != "entity":
            continue
        e = get_entity(ex.entity)
        for f in ex.negative_forms:
            o = get_entity(f.name)
            assert o.name != e.name
            assert o.shape == e.shape or (o.colour == e.colour)
        first = get_entity(ex.negative_forms[0].name)
        assert (first.shape, first.colour) == (e.shape, e.colour)


def test_knowledge_base_covers_every_entity(tmp_path):
    kb = knowledge_base()
    assert set(kb) == {e.name for e in catalogue()}
    for e in catalogue():
        text = kb[e.name]
        # The look alone: the name is the key, and repeating it only misleads the towers.
        assert not any(w in text for w in e.name.split())
        for w in (e.colour, e.shape, e.pattern, e.pattern_colour, *e.mark.split()):
            assert w in text.split(), (w, text)
    path = synth.write_knowledge_base(tmp_path / "kb.json")
    assert json.loads(path.read_text()) == kb


# --- writing to disk ---------------------------------------------------------------

FIELDS = {"index", "image", "caption", "explanation", "phenomenon", "entity", "negative_captions",
          "negative_image", "form", "negative_forms", "scene", "negative_scene", "held_out"}


def test_write_dataset_writes_valid_jsonl_and_images(tmp_path):
    path = write_dataset(tmp_path, "test", 40, seed=2)
    assert path == tmp_path / "test.jsonl"
    records = read_records(path)
    assert [r["index"] for r in records] == list(range(40))
    assert json.loads((tmp_path / "knowledge_base.json").read_text()) == knowledge_base()
    for r, ex in zip(records, make_examples("test", 40, seed=2)):
        assert set(r) == FIELDS
        assert r["caption"] == ex.caption and r["negative_captions"] == ex.negative_captions
        img = np.asarray(Image.open(tmp_path / r["image"]))
        assert np.array_equal(img, render(scene_from_json(r["scene"])))
        assert np.array_equal(np.asarray(Image.open(tmp_path / r["negative_image"])), render(ex.negative_scene))
        assert satisfies(scene_from_json(r["scene"]), form_from_json(r["form"]))
        assert (r["explanation"] is None) == (r["entity"] is None)
    assert not list(tmp_path.rglob("*.tmp"))


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_resume_after_lost_and_torn_lines(tmp_path):
    clean = _lines(write_dataset(tmp_path / "clean", "train", 50, seed=4))
    path = write_dataset(tmp_path / "run", "train", 50, seed=4)
    lines = _lines(path)
    # Drop the last 10 lines and leave half of the next one, as a kill mid-write would.
    path.write_text("\n".join(lines[:40]) + "\n" + lines[40][: len(lines[40]) // 2], encoding="utf-8")
    write_dataset(tmp_path / "run", "train", 50, seed=4)
    assert _lines(path) == clean
    # Torn line ending in a newline, and a second resume that has nothing to do.
    path.write_text("\n".join(lines[:45]) + "\n" + lines[45][:30] + "\n", encoding="utf-8")
    write_dataset(tmp_path / "run", "train", 50, seed=4)
    write_dataset(tmp_path / "run", "train", 50, seed=4)
    assert _lines(path) == clean


def test_resume_refuses_another_seed(tmp_path):
    write_dataset(tmp_path, "val", 5, seed=0)
    with pytest.raises(ValueError, match="different dataset"):
        write_dataset(tmp_path, "val", 10, seed=1)


def test_resume_after_a_real_kill(tmp_path):
    # A child writes a large split; kill -9 it once lines are flowing.
    code = textwrap.dedent(f"""
        from clipmatch_export.synth import write_dataset
        write_dataset({str(tmp_path)!r}, "val", 4000, seed=9)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXPORT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    path = tmp_path / "val.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 20_000):
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = path.read_bytes()
    assert 0 < len(written), "the child wrote nothing before the kill"
    n = written.count(b"\n") + 40
    write_dataset(tmp_path, "val", n, seed=9)
    indices = [r["index"] for r in read_records(path)]
    assert sorted(indices) == list(range(n))
    assert all((tmp_path / f"val/images/{i:06d}.png").exists() for i in indices)


# --- speed, purity, doctests -----------------------------------------------------------

def test_render_rate(train):
    scenes = [ex.scene for ex in train[:2000]]
    t0 = time.perf_counter()
    images = [render(s) for s in scenes]
    dt = time.perf_counter() - t0
    assert len(images) == 2000 and images[0].shape == (64, 64, 3) and images[0].dtype == np.uint8
    print(f"\nrendered 2000 images in {dt:.2f} s: {2000 / dt:.0f} images/s")


def test_needs_no_torch():
    code = "import sys, clipmatch_export.synth as s; s.render(s.make_examples('test', 5)[0].scene); " \
           "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(EXPORT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", [world, entities, forms, captions, dataset, synth], ids=lambda m: m.__name__)
def test_doctests(module):
    result = doctest.testmod(module, verbose=False)
    assert result.failed == 0 and result.attempted > 0


def test_vocabulary_sizes():
    assert len(SHAPES) >= 5 and len(COLOURS) >= 6
    pairs = [np.subtract(COLOURS[a], COLOURS[b]) for a, b in itertools.combinations(COLOURS, 2)]
    assert min(np.linalg.norm(p) for p in pairs) > 80


def test_look_examples_change_one_detail_and_never_draw_a_held_out_entity(train, val):
    held = {get_entity(n).look for n in HELD_OUT_ENTITIES}
    looks = [ex for ex in train + val if ex.phenomenon == "look"]
    assert len(looks) > 100
    for ex in looks:
        (obj,) = [o for o in ex.scene.objects if o.pattern is not None]
        assert (obj.shape, obj.colour, obj.pattern, obj.pattern_colour, obj.mark) not in held
        # The caption says the whole look, in the words of an entity's explanation.
        assert captions.noun_phrase(ex.form) in ex.caption
        for f in ex.negative_forms:
            changed = [k for k in ("pattern", "pattern_colour", "mark") if getattr(f, k) != getattr(ex.form, k)]
            assert len(changed) == 1, (ex.caption, f)
    # Across the split every look attribute is said in many combinations, not as a few fixed strings.
    assert len({(ex.form.colour, ex.form.shape, ex.form.pattern, ex.form.pattern_colour, ex.form.mark)
                for ex in looks}) > 0.5 * len(looks)
