"""Training on a handful of samples: the real code paths, small enough for CI."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")

from clipmatch.errors import DatasetError, ModelNotFoundError  # noqa: E402
from clipmatch_export.train.configs import ClipTrainConfig, HeadsTrainConfig  # noqa: E402
from clipmatch_export.train.data import read_jsonl  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SHAPES = ("circle", "square")
TINY = ClipTrainConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, projection_dim=16,
                       context_length=24, vocab_size=600, epochs=2, batch_size=4, warmup_steps=2)
HEADS = HeadsTrainConfig(num_experts=1, dcsm_text_length=8, dcsm_epochs=1, entity_epochs=1, batch_size=4,
                         warmup_steps=2)


def draw(colour: str, shape: str, x: int) -> Image.Image:
    img = Image.new("RGB", (32, 32), (240, 240, 235))
    d = ImageDraw.Draw(img)
    box = (x, 10, x + 12, 22)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    lines = []
    for i, (colour, shape) in enumerate([(c, s) for c in COLOURS for s in SHAPES] * 2):
        draw(colour, shape, 4 + 8 * (i % 2)).save(root / "images" / f"{i}.png")
        other = "blue" if colour == "red" else "red"
        draw(other, shape, 4 + 8 * (i % 2)).save(root / "images" / f"{i}_neg.png")
        lines.append({"image": f"images/{i}.png", "caption": f"a {colour} {shape}",
                      "explanation": f"a round {colour} thing" if shape == "circle" else None,
                      "negative_captions": [f"a {other} {shape}"], "negative_image": f"images/{i}_neg.png"})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return path


def test_bad_records_name_their_line(dataset, tmp_path):
    good = dataset.read_text().splitlines()
    root = dataset.parent
    cases = {
        "not valid JSON": "{broken",
        "'caption' must be a non-empty string": json.dumps({"image": "images/0.png", "caption": ""}),
        "image file not found": json.dumps({"image": "images/missing.png", "caption": "a cat"}),
        "empty line": "",
        "not in the knowledge base": json.dumps({"image": "images/0.png", "caption": "the X-1", "entity": "X-1"}),
    }
    for problem, bad in cases.items():
        path = root / "bad.jsonl"
        path.write_text("\n".join(good[:3] + [bad] + good[3:5]) + "\n")
        with pytest.raises(DatasetError, match=rf"bad.jsonl:4: .*{problem}"):
            read_jsonl(path, knowledge_base={"Y-2": "a green square"})
        records, report = read_jsonl(path, skip_bad=True, knowledge_base={"Y-2": "a green square"})
        assert len(records) == 5 and report.lines == 6 and len(report.skipped) == 1
        assert "skipped" in report.summary() and problem.split()[0] in report.summary()
    with pytest.raises(ModelNotFoundError):
        read_jsonl(root / "absent.jsonl")


def test_knowledge_base_fills_explanations(dataset):
    path = dataset.parent / "kb.jsonl"
    path.write_text(json.dumps({"image": "images/0.png", "caption": "the Y-2", "entity": "Y-2"}) + "\n")
    records, _ = read_jsonl(path, knowledge_base={"Y-2": "a green square"})
    assert records[0].explanation == "a green square"


def test_train_from_scratch_resumes_to_the_same_weights(dataset, tmp_path):
    from safetensors.numpy import load_file

    from clipmatch_export.train.clip_trainer import train_clip
    from clipmatch_export.train.state import STATE_DIR

    records, _ = read_jsonl(dataset)
    whole = train_clip(records, tmp_path / "whole", TINY, progress=False)
    # Interrupted after one epoch, then resumed: the same weights as one uninterrupted run.
    assert train_clip(records, tmp_path / "split", TINY, progress=False, stop_after=1) is None
    assert (tmp_path / "split" / STATE_DIR / "state.safetensors").is_file()
    split = train_clip(records, tmp_path / "split", TINY, progress=False)
    assert not (split / STATE_DIR).exists()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    untrained = ClipTrainConfig(**{**TINY.__dict__, "epochs": 0})
    fresh = load_file(str(train_clip(records, tmp_path / "fresh", untrained, progress=False) / "model.safetensors"))
    assert any(not np.allclose(a[k], fresh[k]) for k in a)  # training moved the weights


@pytest.fixture(scope="module")
def trained_dir(dataset, tmp_path_factory):
    from clipmatch_export.train.clip_trainer import train_clip

    records, _ = read_jsonl(dataset)
    return train_clip(records, tmp_path_factory.mktemp("trained") / "model", TINY, progress=False)


def test_trained_folder_is_a_real_checkpoint_and_heads_train_export_and_serve(dataset, trained_dir, tmp_path):
    import clipmatch
    from clipmatch_export.exporter import export_model
    from clipmatch_export.train.heads_trainer import train_heads

    records, _ = read_jsonl(dataset)
    manifest = train_heads(records, trained_dir, HEADS, progress=False)
    assert manifest.config.num_experts == 1 and manifest.config.dcsm_text_length == 8
    out = export_model(trained_dir, tmp_path / "export").out_dir
    r = clipmatch.Local(out).rescore("a red circle", [draw("red", "circle", 4), draw("blue", "square", 4)],
                                     explanation="a round red thing")
    assert np.isfinite(r.dcsm).all() and np.isfinite(r.match_prob).all()


def test_fine_tuning_a_checkpoint_keeps_its_tokenizer(dataset, tiny_model_dir, tmp_path):
    from clipmatch_export.train.clip_trainer import train_clip

    records, _ = read_jsonl(dataset)
    config = ClipTrainConfig(**{**TINY.__dict__, "epochs": 1, "lr": 1e-4})
    out = train_clip(records, tmp_path / "tuned", config, init=tiny_model_dir, progress=False)
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["projection_dim"] == 24  # the checkpoint's, not TINY's


def test_cli_train_reports_bad_lines(dataset, tmp_path):
    import subprocess

    from ..conftest import PYTHON

    path = dataset.parent / "cli_bad.jsonl"
    path.write_text(dataset.read_text() + "{oops\n")
    run = subprocess.run([PYTHON, "-m", "clipmatch.cli", "train", "clip", str(path), str(tmp_path / "m"),
                          "--epochs", "0"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "cli_bad.jsonl:13: not valid JSON" in run.stderr, run.stderr[-1500:]


def test_token_loss_prefers_pairs_whose_words_are_in_the_image():
    from clipmatch_export.train.clip_trainer import token_loss

    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)
    img = unit(4, 9, 8)
    words = img[:, [1, 4, 6]] + 0.05 * unit(4, 3, 8)  # text i's words are patches of image i
    mask = torch.ones(4, 3, dtype=torch.long)
    ids = torch.arange(4)
    scale = torch.tensor(2.0)
    aligned = token_loss(img, torch.nn.functional.normalize(words, dim=-1), mask, scale, ids, ids)
    shuffled = token_loss(img, torch.nn.functional.normalize(words[[1, 2, 3, 0]], dim=-1), mask, scale, ids, ids)
    assert aligned < shuffled


def test_anonymised_copies_swap_names_consistently(dataset):
    from clipmatch_export.train.data import Record
    from clipmatch_export.train.heads_trainer import anonymised_copies

    r = Record(1, dataset.parent / "images" / "0.png", "a photo of the Kestrel-7 valve",
               "the Kestrel-7 valve is a blue circle with yellow stripes", ("the Orrin pump",),
               extra={"negative_explanations": ["the Orrin pump is a blue circle with red dots"]})
    plain = Record(2, r.image, "a red circle")
    (copy,), copied = anonymised_copies([r, plain], seed=0)
    assert copied == {0}
    new_name = copy.caption.split("the ")[1].split(" valve")[0]
    assert "Kestrel" not in copy.caption + copy.explanation and new_name != "Kestrel-7"
    assert copy.explanation == f"the {new_name} valve is a blue circle with yellow stripes"
    other = copy.negative_captions[0].split("the ")[1].split(" pump")[0]
    assert other not in ("Orrin", new_name)
    assert copy.extra["negative_explanations"] == [f"the {other} pump is a blue circle with red dots"]


def test_knowledge_base_gives_lookalikes_their_explanations(dataset):
    path = dataset.parent / "neg.jsonl"
    path.write_text(json.dumps({"image": "images/0.png", "caption": "the Y-2", "entity": "Y-2",
                                "negative_captions": ["the Y-20", "the Z-3"]}) + "\n")
    kb = {"Y-2": "a green square", "Y-20": "a green square with dots", "Z-3": "a red cross"}
    records, _ = read_jsonl(path, knowledge_base=kb)
    assert records[0].extra["negative_explanations"] == ["a green square with dots", "a red cross"]


def test_localisation_targets_point_words_at_their_objects(tiny_model_dir):
    from clipmatch.inputs.tokenizer import ClipTokenizer
    from clipmatch_export.train.localise import word_patch_targets

    tok = ClipTokenizer.from_dir(tiny_model_dir)
    scene = {"objects": [{"shape": "circle", "colour": "red", "size": "big", "x": 16, "y": 32},
                         {"shape": "square", "colour": "blue", "size": "big", "x": 48, "y": 32}]}
    texts = ["a red circle left of a blue square", "a red circle and no blue square", "a red circle"]
    t = word_patch_targets(texts, [scene, scene, None], tok, 16, 64, 8)
    grid = lambda row: row[1:].reshape(8, 8)
    from clipmatch_export.train.localise import _word_per_token

    words = _word_per_token(tok, texts[0])  # the word each token belongs to
    red, circle, blue = (grid(t[0, words.index(w)]) for w in ("red", "circle", "blue"))
    assert red.any() and torch.equal(red, circle)
    # Radius-10 objects at (16, 32) and (48, 32): the 8-px patches whose centres lie within 10 px.
    assert red.nonzero().tolist() == [[3, 1], [3, 2], [4, 1], [4, 2]]
    assert blue.nonzero().tolist() == [[3, 5], [3, 6], [4, 5], [4, 6]]
    assert not t[0, :, 0].any()  # never the CLS token
    after_no = t[1, _word_per_token(tok, texts[1]).index("no") + 1:]
    assert not after_no.any() and t[1].any()  # the absent blue square teaches nothing
    assert not t[2].any()  # no scene, no targets


def test_localisation_loss_rewards_words_on_their_object():
    from clipmatch_export.train.localise import localisation_loss

    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(2, 10, 8, generator=g), dim=-1)
    target = torch.zeros(2, 3, 10, dtype=torch.bool)
    target[:, 1, 4:6] = True  # word 1 names the object on patches 4 and 5
    on_object = img[:, [0, 4, 0]]
    on_background = img[:, [0, 8, 0]]
    scale = torch.tensor(2.0)
    assert localisation_loss(img, on_object, target, scale) < localisation_loss(img, on_background, target, scale)


def test_captions_longer_than_the_context_name_their_line(dataset, tmp_path, capsys):
    from clipmatch_export.train.clip_trainer import train_clip

    long_caption = " ".join(["a red circle"] * 20)  # far over TINY's 24-token context
    path = dataset.parent / "long.jsonl"
    path.write_text(dataset.read_text() + json.dumps({"image": "images/0.png", "caption": long_caption}) + "\n")
    records, _ = read_jsonl(path)
    config = ClipTrainConfig(**{**TINY.__dict__, "epochs": 1})
    with pytest.raises(DatasetError, match=r"longer than the 24-token context, first on lines \[13\]"):
        train_clip(records, tmp_path / "strict", config, progress=False)
    assert train_clip(records, tmp_path / "lenient", config, skip_bad=True, progress=False) is not None
    assert "skipped 1 over-long texts (lines [13]" in capsys.readouterr().out


def test_training_one_stage_keeps_the_other_heads_and_reads_every_hard_negative(dataset, trained_dir, tmp_path):
    import shutil

    from clipmatch_export.models.heads import load_heads
    from clipmatch_export.train.heads_trainer import train_heads

    model = tmp_path / "model"
    shutil.copytree(trained_dir, model)
    records, _ = read_jsonl(dataset)
    train_heads(records, model, HEADS, progress=False)
    before, _ = load_heads(model)
    # A second hard-negative caption per record: the DCSM stage scores images against it too.
    more = [dataclasses.replace(r, negative_captions=(*r.negative_captions, r.caption.replace("a ", "a big ", 1)))
            for r in records]
    train_heads(more, model, dataclasses.replace(HEADS, seed=5), stages=("dcsm",), progress=False)
    after, _ = load_heads(model)
    for name, value in before.entity.state_dict().items():
        torch.testing.assert_close(after.entity.state_dict()[name], value, rtol=0, atol=0)
    changed = [n for n, v in before.dcsm.state_dict().items() if not torch.equal(after.dcsm.state_dict()[n], v)]
    assert changed, "the DCSM stage did not train"


def test_features_hold_every_hard_negative_caption(dataset, trained_dir):

    from clipmatch.inputs.preprocess import ImageConfig
    from clipmatch.inputs.tokenizer import ClipTokenizer
    from clipmatch_export.models.clip_loader import load_clip
    from clipmatch_export.train.heads_trainer import compute_features

    records, _ = read_jsonl(dataset)
    records = [dataclasses.replace(r, negative_captions=(*r.negative_captions, "a big thing") if i % 2 else ())
               for i, r in enumerate(records)]
    clip, files = load_clip(trained_dir)
    feats = compute_features(records, clip, ClipTokenizer.from_dir(trained_dir),
                             ImageConfig.from_preprocessor_config(files.preprocessor_config), ("big",), progress=False)
    assert feats.more_captions.shape[:2] == (len(records), 1)
    assert feats.has_more_caption[:, 0].tolist() == [bool(i % 2) for i in range(len(records))]
    ids = feats.more_caption_functional[1, 0].tolist()
    assert set(ids) == {0, 1} and ids[1] == 0  # "big" marked at its own tokens, "a" not


def test_train_default_runs_every_stage_and_records_it(tmp_path):
    from clipmatch_export.evaluation.fusion_fit import FusionFitConfig
    from clipmatch_export.train.default_model import RECIPE_FILE, DefaultRecipe, build_default_model

    recipe = DefaultRecipe(seed=3, train_size=40, clip=dataclasses.replace(TINY, epochs=1), heads=HEADS,
                           fusion=FusionFitConfig(per_row=4, queries_per_row=3, shortlist=8))
    manifest = build_default_model(tmp_path / "model", tmp_path / "data", recipe, progress=False)
    record = json.loads((tmp_path / "model" / RECIPE_FILE).read_text())
    assert set(record["seconds"]) == {"data", "clip", "heads", "fusion", "total"}
    assert record["recipe"]["fusion"]["shortlist"] == 8 and record["recipe"]["seed"] == 3
    # The fitted weights are the last stage's output, stored with the heads.
    assert manifest.fusion is not None and manifest.fusion.fitted["plain"]["queries"] == 12
    assert manifest.fusion.fitted["explained"]["queries"] == 6


def test_heads_training_is_bit_reproducible_on_several_threads(tmp_path):
    # On the default model's towers and 400 synthetic records, two runs with one seed
    # differed by up to 1.6e-7 after one entity epoch before training used
    # PyTorch's deterministic kernels; now they must not differ at all.
    import shutil

    import torch
    from safetensors.numpy import load_file

    from clipmatch_export.synth.dataset import write_dataset
    from clipmatch_export.synth.entities import write_knowledge_base
    from clipmatch_export.train.heads_trainer import train_heads

    default = Path(__file__).resolve().parents[2] / "models" / "default"
    if not (default / "config.json").is_file():
        pytest.skip("no default model")
    jsonl = write_dataset(tmp_path / "data", "train", 400, seed=11)
    kb = json.loads(write_knowledge_base(tmp_path / "data" / "kb.json").read_text())
    records, _ = read_jsonl(jsonl, knowledge_base=kb)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        weights = []
        for run in ("a", "b"):
            model = Path(shutil.copytree(default, tmp_path / run))
            train_heads(records, model, HeadsTrainConfig(entity_epochs=1), stages=("entity",), progress=False)
            weights.append(load_file(str(model / "clipmatch_heads.safetensors")))
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
    a, b = weights
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_resumed_heads_run_reads_its_tower_features_back(dataset, trained_dir, tmp_path, monkeypatch):
    """Killed after the features were encoded: the next run does not encode them again, and ends
    with the heads an uninterrupted run trains (and no features left behind)."""
    import shutil

    from safetensors.numpy import load_file

    from clipmatch_export.train import heads_trainer
    from clipmatch_export.train.state import FEATURES, STATE_DIR

    records, _ = read_jsonl(dataset)
    whole = shutil.copytree(trained_dir, tmp_path / "whole")
    heads_trainer.train_heads(records, whole, HEADS, progress=False)
    split = shutil.copytree(trained_dir, tmp_path / "split")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(heads_trainer, "_fit", killed)
        with pytest.raises(KeyboardInterrupt):
            heads_trainer.train_heads(records, split, HEADS, progress=False)
    assert (split / STATE_DIR / FEATURES).is_file()

    def never(*args, **kwargs):
        raise AssertionError("features encoded again")

    monkeypatch.setattr(heads_trainer, "compute_features", never)
    heads_trainer.train_heads(records, split, HEADS, progress=False)
    assert not (split / STATE_DIR / FEATURES).exists()
    a, b = (load_file(str(d / "clipmatch_heads.safetensors")) for d in (whole, split))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
