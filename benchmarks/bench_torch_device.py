"""PyTorch on an accelerator against PyTorch on the CPU and the exported graphs on onnxruntime, in one run.

For each component of a model (image and text towers, entity heads, DCSM)
and each batch size, on the export gate's own random inputs:

- parity: max |device - CPU| for PyTorch, and max |onnxruntime - CPU PyTorch|
  for the exported fp32 graph, the number the export gate checks;
- latency: median ms of PyTorch on the CPU, PyTorch on the device and the
  graph on onnxruntime's CPU provider, and the CPU / device ratio.

The device runs twice: as PyTorch sets it up by default (cuDNN may use TF32
for convolutions, the image tower's patch embedding) and in strict fp32
(TF32 off everywhere), so the parity figures say what each setting costs.

    python benchmarks/bench_torch_device.py [--model models/default | --vit-b32] [--device cuda] [--json OUT]

``--vit-b32`` runs a ViT-B/32-shaped CLIP with random weights and random
heads instead (``benchmarks/bench_towers.py`` builds it), where the towers
are big enough for the device to matter.

Needs a CUDA (or other torch) device; without one it says so and exits 2.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipmatch.contract import DCSM, ENTITY_IMAGE, ENTITY_PAIR, ENTITY_QUERY, IMAGE_TOWER, TEXT_TOWER
from clipmatch.inputs.tokenizer import ClipTokenizer
from clipmatch_export.exporter import ExportOptions, export_model
from clipmatch_export.models.clip_loader import load_clip
from clipmatch_export.models.heads import load_heads
from clipmatch_export.models.mmae import EntityImage, EntityPair, EntityQuery
from clipmatch_export.models.towers import ImageTower, TextTower
from clipmatch_export.onnx_export import run_torch
from clipmatch_export.parity import TokenIds, random_inputs


def median_ms(fn, repeats: int, sync=lambda: None) -> float:
    for _ in range(5):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "default")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,8,100")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--vit-b32", action="store_true", help="a ViT-B/32-shaped random CLIP with random heads")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to compare")
        return 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    import onnxruntime as ort

    keep = tempfile.TemporaryDirectory()
    if args.vit_b32:
        from clipmatch_export.tiny import add_random_heads, build_vit_b32

        args.model = build_vit_b32(Path(keep.name) / "vit-b32")
        add_random_heads(args.model, seed=0, dcsm_text_length=30)
    clip, _ = load_clip(args.model)
    heads, manifest = load_heads(args.model)
    modules = {IMAGE_TOWER: ImageTower(clip).eval(), TEXT_TOWER: TextTower(clip).eval(),
               ENTITY_IMAGE: EntityImage(heads.entity).eval(), ENTITY_QUERY: EntityQuery(heads.entity).eval(),
               ENTITY_PAIR: EntityPair(heads.entity).eval(), DCSM: heads.dcsm.eval()}
    results = {"model": "ViT-B/32 shape, random" if args.vit_b32 else str(args.model),
               "machine": platform.machine(), "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else str(device), "torch": torch.__version__, "onnxruntime": ort.__version__,
               "components": {}}
    with tempfile.TemporaryDirectory() as tmp:
        export = export_model(args.model, Path(tmp) / "export", ExportOptions(fp16=False))
        sizes = export.manifest.sizes
        tok = ClipTokenizer.from_dir(export.out_dir, context_length=sizes["context_length"])
        ids = TokenIds(tok.bos_id, tok.eos_id, tok.pad_id, clip.config.text_config.vocab_size)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        rng = np.random.default_rng(0)
        for spec, module in modules.items():
            session = ort.InferenceSession(str(export.out_dir / spec.filename), options,
                                           providers=["CPUExecutionProvider"])
            for batch in (int(b) for b in args.batches.split(",")):
                length = sizes["context_length"] // 2
                feeds = random_inputs(spec, sizes, batch, rng, ids=ids, text_length=length,
                                      explanation_length=length - 1,
                                      num_functional=len(manifest.config.functional_words))
                module.to("cpu")  # the same module, moved back and forth
                cpu = run_torch(module, spec, feeds)
                cpu_ms = median_ms(lambda: run_torch(module, spec, feeds), args.repeats)
                ort_feeds = {t.name: feeds[t.name] for t in spec.inputs}
                names = [t.name for t in spec.outputs]
                got = dict(zip(names, session.run(names, ort_feeds)))
                ort_ms = median_ms(lambda: session.run(names, ort_feeds), args.repeats)
                on_device = module.to(device)
                inputs = [torch.from_numpy(feeds[t.name]).to(device) for t in spec.inputs]
                row = {"torch_cpu_ms": round(cpu_ms, 3), "ort_cpu_ms": round(ort_ms, 3),
                       "ort_vs_cpu_max_abs": max(float(np.abs(got[n] - cpu[n]).max()) for n in names)}
                for mode, tf32 in (("default", None), ("strict_fp32", False)):
                    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                    if tf32 is not None:
                        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32

                    def run():
                        with torch.no_grad():
                            out = on_device(*inputs)
                        return out if isinstance(out, tuple) else (out,)

                    out = {n: o.float().cpu().numpy() for n, o in zip(names, run())}
                    row[f"{mode}_ms"] = round(median_ms(run, args.repeats, sync), 3)
                    row[f"{mode}_vs_cpu_max_abs"] = max(float(np.abs(out[n] - cpu[n]).max()) for n in names)
                    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
                row["cpu_over_device"] = round(cpu_ms / row["default_ms"], 2)
                results["components"].setdefault(spec.name, {})[str(batch)] = row
    print(f"{results['device']}, torch {results['torch']}, onnxruntime {results['onnxruntime']} (CPU provider)")
    print(f"{'component':>13} {'batch':>5} | {'torch CPU':>9} {'ORT CPU':>8} {'device':>8} {'CPU/dev':>7} | "
          f"{'|ORT-CPU|':>9} {'|dev-CPU|':>9} {'strict':>9}")
    for name, by_batch in results["components"].items():
        for batch, r in by_batch.items():
            print(f"{name:>13} {batch:>5} | {r['torch_cpu_ms']:9.3f} {r['ort_cpu_ms']:8.3f} {r['default_ms']:8.3f} "
                  f"{r['cpu_over_device']:6.2f}x | {r['ort_vs_cpu_max_abs']:9.2e} {r['default_vs_cpu_max_abs']:9.2e} "
                  f"{r['strict_fp32_vs_cpu_max_abs']:9.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    keep.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
