"""``clipmatch train default``: the embedded default model, from nothing, in one command.

Writes the synthetic world's train split, trains the CLIP towers from
scratch on it, then the DCSM and MMAE/GI-ITM heads on the frozen towers,
fits the search's fusion weights on the validation split, and records the
recipe, the seed and the time of each stage next to the model.
Re-running with the same seed reproduces it; an interrupted run resumes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipmatch.manifest import HeadsManifest
from clipmatch_export.evaluation.fusion_fit import FusionFitConfig, fit_model_fusion
from clipmatch_export.synth.dataset import write_dataset
from clipmatch_export.synth.entities import write_knowledge_base
from clipmatch_export.train.clip_trainer import train_clip
from clipmatch_export.train.configs import ClipTrainConfig, HeadsTrainConfig
from clipmatch_export.train.data import read_jsonl
from clipmatch_export.train.heads_trainer import train_heads
from clipmatch_export.versions import versions

RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class DefaultRecipe:
    seed: int = 0
    train_size: int = 10_000
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    heads: HeadsTrainConfig = field(default_factory=HeadsTrainConfig)
    fusion: FusionFitConfig = field(default_factory=FusionFitConfig)


def build_default_model(out_dir: str | Path = "models/default", data_dir: str | Path = ".cache/synth",
                        recipe: DefaultRecipe = DefaultRecipe(), *, progress: bool = True) -> HeadsManifest:
    out, data = Path(out_dir), Path(data_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    jsonl = write_dataset(data, "train", recipe.train_size, recipe.seed)
    kb = write_knowledge_base(data / "knowledge_base.json")
    seconds["data"] = round(time.perf_counter() - t0, 1)

    records, report = read_jsonl(jsonl, knowledge_base=json.loads(kb.read_text()))
    print(report.summary())
    t0 = time.perf_counter()
    clip = ClipTrainConfig(**{**asdict(recipe.clip), "seed": recipe.seed})
    train_clip(records, out, clip, progress=progress)
    seconds["clip"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    heads = HeadsTrainConfig(**{**asdict(recipe.heads), "seed": recipe.seed})
    train_heads(records, out, heads, progress=progress)
    seconds["heads"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    fit_model_fusion(out, recipe.fusion)
    seconds["fusion"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(sum(seconds.values()), 1)
    (out / RECIPE_FILE).write_text(json.dumps({
        "command": f"clipmatch train default --out {out} --seed {recipe.seed} --train-size {recipe.train_size}",
        "recipe": asdict(recipe), "seconds": seconds, "versions": versions()}, indent=2) + "\n")
    print(f"default model written to {out} in {seconds['total']:.0f} s: {seconds}")
    return HeadsManifest.read(out)
