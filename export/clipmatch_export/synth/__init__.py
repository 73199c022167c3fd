"""A synthetic world of coloured shapes and invented entities, for training and
testing clipmatch's small default CLIP and its heads.

It makes the four things plain cosine gets wrong well defined and checkable:
attribute binding, spatial relations, negation and unseen entities. Every
caption carries a logical form (``satisfies(scene, form)``), every example
hard-negative captions and usually a hard-negative image, and train/val/test
hold out colour-shape pairs and entities. numpy and PIL only, no torch.

Modules, smallest first: ``world`` (objects, scenes, rendering), ``entities``
(catalogue and knowledge base), ``forms`` (logical forms), ``captions``
(one builder per phenomenon), ``dataset`` (splits, writing to disk).

    >>> ex = make_examples("train", 2, seed=0)
    >>> render(ex[0].scene).shape, satisfies(ex[0].scene, ex[0].form)
    ((64, 64, 3), True)
"""
from clipmatch_export.synth.captions import FUNCTIONAL_WORDS, PHENOMENA, Draft, SplitRules, compose, noun_phrase
from clipmatch_export.synth.dataset import (
    DEFAULT_MIXTURE,
    SPLITS,
    Example,
    all_caption_words,
    example_record,
    make_example,
    make_examples,
    read_records,
    split_rules,
    tokenizer_corpus,
    write_dataset,
)
from clipmatch_export.synth.entities import (
    HELD_OUT_ENTITIES,
    Entity,
    catalogue,
    get_entity,
    knowledge_base,
    lookalikes,
    write_knowledge_base,
)
from clipmatch_export.synth.forms import And, EntityIs, Form, Has, Not, Rel, form_from_json, form_to_json, mentions, satisfies
from clipmatch_export.synth.world import (
    CANVAS,
    COLOURS,
    HELD_OUT_COMBOS,
    MARKS,
    PATTERNS,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    relation,
    render,
    scene_from_json,
    scene_to_json,
)

__all__ = [
    # world
    "CANVAS", "SHAPES", "COLOURS", "SIZES", "PATTERNS", "MARKS", "RELATIONS", "HELD_OUT_COMBOS",
    "Obj", "Scene", "render", "relation", "scene_to_json", "scene_from_json",
    # entities
    "Entity", "catalogue", "get_entity", "lookalikes", "HELD_OUT_ENTITIES", "knowledge_base",
    "write_knowledge_base",
    # forms
    "Has", "EntityIs", "Rel", "Not", "And", "Form", "satisfies", "form_to_json", "form_from_json", "mentions",
    # captions
    "PHENOMENA", "FUNCTIONAL_WORDS", "SplitRules", "Draft", "compose", "noun_phrase",
    # dataset
    "SPLITS", "DEFAULT_MIXTURE", "Example", "split_rules", "make_example", "make_examples", "example_record",
    "write_dataset", "read_records", "tokenizer_corpus", "all_caption_words",
]
