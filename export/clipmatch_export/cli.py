"""The PyTorch side's commands of ``clipmatch``: demo, tiny, init-heads, export, train, eval, fit-fusion.

The SDK's ``clipmatch`` command finds them through the ``clipmatch.commands`` entry
point (``register``). Importing this module needs no torch: each command imports the
PyTorch side when it runs, and says which extra to install when that is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipmatch_export.extras import require_torch_side
from clipmatch_export.train.configs import ClipTrainConfig, HeadsTrainConfig


def cmd_tiny(args) -> int:
    require_torch_side()
    from clipmatch_export.tiny import build_tiny_clip

    print(build_tiny_clip(args.out_dir, seed=args.seed))
    return 0


def cmd_init_heads(args) -> int:
    require_torch_side()
    from clipmatch.manifest import HEADS_MANIFEST
    from clipmatch_export.tiny import add_random_heads

    if (Path(args.model_dir) / HEADS_MANIFEST).exists() and not args.force:
        print(f"clipmatch: {args.model_dir} already has heads; --force replaces them", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("num_experts", args.num_experts),
                                   ("dcsm_text_length", args.dcsm_text_length)) if v is not None}
    manifest = add_random_heads(args.model_dir, seed=args.seed, **overrides)
    print(json.dumps(manifest.config.to_dict()))
    return 0


def cmd_export(args) -> int:
    require_torch_side()
    from clipmatch_export.exporter import ExportOptions, export_model
    from clipmatch_export.parity import FP16, Tolerance

    options = ExportOptions(opset=args.opset, fp16=not args.no_fp16, towers_only=args.towers_only, seed=args.seed,
                            fp16_tolerance=Tolerance(atol=args.fp16_atol, rtol=FP16.rtol), progress=True)
    result = export_model(args.model_dir, args.out_dir, options)
    for name in result.manifest.components:
        line = f"{name:13s} fp32 max|diff| {result.report.worst(name, 'fp32'):.2e}"
        if options.fp16:
            line += f"   fp16 max|diff| {result.report.worst(name, 'fp16'):.2e}"
        print(line)
    if args.tensorrt:
        from clipmatch_export.tensorrt_build import build_for_export

        for name, path in build_for_export(result.out_dir, max_batch=args.trt_max_batch,
                                           opt_batch=args.trt_opt_batch).items():
            print(f"{name:13s} TensorRT engine {path}")
    print(f"exported to {result.out_dir}")
    return 0


def _config_args(parser: argparse.ArgumentParser, fields_of) -> None:
    """One --flag per config field, so the command line and the config never drift apart."""
    import dataclasses

    for f in dataclasses.fields(fields_of):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                                metavar="BOOL")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=f"default {f.default}")


def _config_from(args, cls):
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None})


def _records(args):
    from clipmatch_export.train.data import read_jsonl

    kb = json.loads(Path(args.kb).read_text()) if args.kb else None
    records, report = read_jsonl(args.data, skip_bad=args.skip_bad, knowledge_base=kb)
    print(report.summary())
    return records


def cmd_train_clip(args) -> int:
    require_torch_side()
    from clipmatch_export.train.clip_trainer import train_clip

    out = train_clip(_records(args), args.out_dir, _config_from(args, ClipTrainConfig), init=args.init,
                     skip_bad=args.skip_bad)
    print(f"CLIP checkpoint written to {out}")
    return 0


def cmd_train_heads(args) -> int:
    require_torch_side()
    from clipmatch_export.train.heads_trainer import train_heads

    manifest = train_heads(_records(args), args.model_dir, _config_from(args, HeadsTrainConfig),
                           stages=args.stages.split(","))
    print(f"heads written next to {args.model_dir}: {json.dumps(manifest.config.to_dict())}")
    return 0


def cmd_train_default(args) -> int:
    require_torch_side()
    from clipmatch_export.train.default_model import DefaultRecipe, build_default_model

    build_default_model(args.out, args.data, DefaultRecipe(seed=args.seed, train_size=args.train_size))
    return 0


def _labelled_eval(args) -> int:
    import tempfile

    from clipmatch.backends.local import Local
    from clipmatch.explain.explainers import KnowledgeBaseExplainer
    from clipmatch.retrieval.labelled import evaluate_labelled, format_table, open_gallery, read_labelled
    from clipmatch.retrieval.search import Searcher

    kb = KnowledgeBaseExplainer(args.kb) if args.kb else None
    queries = read_labelled(args.data, knowledge_base=kb)
    model = Path(args.model)
    with tempfile.TemporaryDirectory(prefix="clipmatch-eval-") as tmp:
        if (model / "clipmatch_export.json").is_file():  # an export: no PyTorch needed
            matcher = Local(model)
        else:
            require_torch_side()
            from clipmatch_export.exporter import ExportOptions, export_model

            matcher = Local(export_model(model, Path(tmp) / "export", ExportOptions(fp16=False)).out_dir)
        index = open_gallery(matcher, args.gallery, queries, tmp)
        result = evaluate_labelled(Searcher(matcher, index), queries, args.shortlist or 100)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_eval(args) -> int:
    from clipmatch.backends.local import Local

    if args.data is not None:
        return _labelled_eval(args)
    require_torch_side()
    from clipmatch_export.evaluation.evaluate import EvalConfig, evaluate, format_markdown, write_json
    from clipmatch_export.exporter import exported

    config = EvalConfig(**{k: v for k, v in (("seed", args.seed), ("per_row", args.per_row),
                                             ("gallery_size", args.gallery_size), ("shortlist", args.shortlist))
                           if v is not None})
    with exported(args.model) as export_dir:
        result = evaluate(Local(export_dir), config)
    print(format_markdown(result))
    if args.json:
        write_json(result, args.json)
    return 0


def cmd_fit_fusion(args) -> int:
    require_torch_side()
    from clipmatch_export.evaluation.fusion_fit import FusionFitConfig, fit_model_fusion, format_fit

    if args.data is not None:
        from clipmatch_export.evaluation.fusion_fit import fit_labelled_fusion

        fusion = fit_labelled_fusion(args.model, args.data, gallery=args.gallery, knowledge_base=args.kb,
                                     write=not args.dry_run)
    else:
        config = FusionFitConfig(**({} if args.seed is None else {"seed": args.seed}))
        fusion = fit_model_fusion(args.model, config, write=not args.dry_run)
    print(format_fit(fusion))
    if not args.dry_run:
        print(f"fusion weights written to {Path(args.model) / 'clipmatch_heads.json'}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(fusion.to_dict(), indent=2) + "\n")
    return 0


def cmd_demo(args) -> int:
    from clipmatch_export.demo import run_demo

    return run_demo(workdir=args.workdir, repeats=args.repeats, tiny=args.tiny)


def _labelled_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", type=Path, default=None,
                   help="labelled queries over your own gallery (JSONL: query, relevant, optional explanation or "
                        "entity; see the README) instead of the synthetic split")
    s.add_argument("--gallery", type=Path, default=None,
                   help="with --data: an index folder, or a folder of images (default: the images the queries name)")
    s.add_argument("--kb", type=Path, default=None, help="with --data: knowledge base for 'entity' fields")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this side's commands to the ``clipmatch`` parser (the entry point the SDK calls)."""
    s = sub.add_parser("demo", help="the default model end to end: export, load, query, rankings and latency")
    s.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    s.add_argument("--repeats", type=int, default=20, help="timed repeats per latency figure")
    s.add_argument("--tiny", action="store_true", help="a tiny random model built on the spot instead")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("tiny", help="write a tiny random CLIP checkpoint")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_tiny)

    s = sub.add_parser("init-heads", help="attach freshly initialised (untrained) heads to a checkpoint")
    s.add_argument("model_dir", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-experts", type=int, default=None)
    s.add_argument("--dcsm-text-length", type=int, default=None)
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_init_heads)

    s = sub.add_parser("export", help="export a checkpoint to checked ONNX graphs (and TensorRT engines)")
    s.add_argument("model_dir", type=Path)
    s.add_argument("out_dir", type=Path)
    s.add_argument("--towers-only", action="store_true", help="export without the rescoring heads")
    s.add_argument("--no-fp16", action="store_true", help="skip the fp16 graphs")
    s.add_argument("--opset", type=int, default=17)
    s.add_argument("--fp16-atol", type=float, default=2e-3,
                   help="fp16 parity tolerance: |onnx - torch| <= atol + 1e-2 * |torch|")
    s.add_argument("--seed", type=int, default=0, help="seed of the parity inputs")
    s.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs tensorrt + GPU)")
    s.add_argument("--trt-max-batch", type=int, default=64)
    s.add_argument("--trt-opt-batch", type=int, default=8)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("train", help="train the CLIP towers or the rescoring heads on a JSONL dataset")
    train = s.add_subparsers(dest="stage", required=True)
    t = train.add_parser("clip", help="contrastive training: from scratch, or fine-tuning --init MODEL_DIR")
    t.add_argument("data", type=Path, help="JSONL: image, caption, optional explanation and hard negatives")
    t.add_argument("out_dir", type=Path)
    t.add_argument("--init", type=Path, default=None, help="a CLIP checkpoint folder to fine-tune")
    _config_args(t, ClipTrainConfig)
    t.set_defaults(func=cmd_train_clip)
    t = train.add_parser("heads", help="DCSM and MMAE/GI-ITM on the frozen towers of MODEL_DIR")
    t.add_argument("data", type=Path)
    t.add_argument("model_dir", type=Path)
    t.add_argument("--stages", default="dcsm,entity")
    _config_args(t, HeadsTrainConfig)
    t.set_defaults(func=cmd_train_heads)
    t = train.add_parser("default", help="the default model: synthetic data, CLIP from scratch, then the heads")
    t.add_argument("--out", type=Path, default=Path("models/default"))
    t.add_argument("--data", type=Path, default=Path(".cache/synth"), help="where the synthetic data is written")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--train-size", type=int, default=10_000)
    t.set_defaults(func=cmd_train_default)
    for t in (train.choices["clip"], train.choices["heads"]):
        t.add_argument("--kb", default=None, help="knowledge base JSON (entity -> explanation)")
        t.add_argument("--skip-bad", action="store_true", help="skip, count and report bad records")

    s = sub.add_parser("eval", help="per-phenomenon table on the synthetic test split: cosine vs each head")
    s.add_argument("model", nargs="?", type=Path, default=Path("models/default"),
                   help="a model folder (exported on the fly) or an export folder")
    s.add_argument("--seed", type=int, default=None, help="test-set seed (default differs from training)")
    s.add_argument("--per-row", type=int, default=None)
    s.add_argument("--gallery-size", type=int, default=None)
    s.add_argument("--shortlist", type=int, default=None, help="cosine top-K the heads rescore (default 100, as search)")
    s.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    _labelled_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("fit-fusion", help="fit the search fusion weights on the synthetic validation split")
    s.add_argument("model", nargs="?", type=Path, default=Path("models/default"),
                   help="a model folder with heads; the weights go into its clipmatch_heads.json")
    s.add_argument("--seed", type=int, default=None, help="validation-set seed")
    s.add_argument("--dry-run", action="store_true", help="print the fit, write nothing to the model")
    s.add_argument("--json", type=Path, default=None, help="also write the weights and figures as JSON")
    _labelled_args(s)
    s.set_defaults(func=cmd_fit_fusion)
