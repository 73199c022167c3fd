"""Resumable training state: model and AdamW moments in safetensors, counters in JSON.

Written atomically after every epoch, so a killed run resumes from the last
finished epoch and loses at most one epoch of work. Nothing is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_DIR = "train_state"


def save_state(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    state_dir = out_dir / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq"):
                    tensors[f"optim.{names[id(p)]}.{key}"] = st[key].contiguous()
                meta.setdefault("optim_steps", {})[names[id(p)]] = float(st["step"])
    tmp = state_dir / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(state_dir / "state.safetensors")
    tmp_meta = state_dir / "state.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp_meta.replace(state_dir / "state.json")


def load_state(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               expect: dict[str, Any]) -> dict[str, Any] | None:
    """Restore a run; None when there is nothing to resume or it was a different run."""
    state_dir = out_dir / STATE_DIR
    if not (state_dir / "state.json").is_file() or not (state_dir / "state.safetensors").is_file():
        return None
    meta = json.loads((state_dir / "state.json").read_text())
    if any(meta.get(k) != v for k, v in expect.items()):
        return None  # another configuration or dataset: start afresh rather than mix runs
    tensors = load_file(str(state_dir / "state.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    steps = meta.get("optim_steps", {})
    for name, p in params.items():
        if f"optim.{name}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": torch.tensor(steps.get(name, 0.0)),
                "exp_avg": tensors[f"optim.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"optim.{name}.exp_avg_sq"].clone(),
            }
    return meta


def clear_state(out_dir: Path) -> None:
    state_dir = out_dir / STATE_DIR
    for name in ("state.safetensors", "state.json"):
        (state_dir / name).unlink(missing_ok=True)
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()


def saved_run(out_dir: Path) -> dict[str, Any] | None:
    """The ``run`` description of the state waiting in ``out_dir``, if any."""
    path = out_dir / STATE_DIR / "state.json"
    return json.loads(path.read_text()).get("run") if path.is_file() else None


FEATURES = "features.safetensors"


def save_features(out_dir: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Tower features of a run, kept until the run finishes, so a resumed run need not encode
    its records again (minutes at ViT-B/32 size on a CPU)."""
    state_dir = out_dir / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (FEATURES + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key})
    tmp.replace(state_dir / FEATURES)


def load_features(out_dir: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The features saved for ``key`` (records, towers and tokenizer), or None."""
    from safetensors import safe_open

    path = out_dir / STATE_DIR / FEATURES
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None  # another dataset or model: encode afresh
        return {name: f.get_tensor(name) for name in f.keys()}


def clear_features(out_dir: Path) -> None:
    (out_dir / STATE_DIR / FEATURES).unlink(missing_ok=True)
    state_dir = out_dir / STATE_DIR
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
