"""The ``clipmatch`` command.

    clipmatch demo                      build a tiny model, export it, score, print ranking and latency
    clipmatch tiny OUT_DIR              write a tiny random CLIP checkpoint (Hugging Face format)
    clipmatch init-heads MODEL_DIR      attach freshly initialised rescoring heads to a checkpoint
    clipmatch export MODEL_DIR OUT_DIR  ONNX graphs (+ fp16, + TensorRT engines) with a parity gate
    clipmatch rank EXPORT_DIR -q TEXT IMAGE...   rank images for a query with every head

Commands that need PyTorch say so when it is missing (pip install 'clipmatch[export]').
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import ClipmatchError, DependencyError


def _export_package():
    try:
        import clipmatch_export
    except ImportError as exc:
        raise DependencyError(
            f"this command needs the PyTorch side: pip install 'clipmatch[export]' ({exc})"
        ) from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown a command's own output
    return clipmatch_export


def cmd_tiny(args) -> int:
    _export_package()
    from clipmatch_export.tiny import build_tiny_clip

    print(build_tiny_clip(args.out_dir, seed=args.seed))
    return 0


def cmd_init_heads(args) -> int:
    _export_package()
    from clipmatch_export.tiny import add_random_heads
    from .manifest import HEADS_MANIFEST

    if (Path(args.model_dir) / HEADS_MANIFEST).exists() and not args.force:
        print(f"clipmatch: {args.model_dir} already has heads; --force replaces them", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("num_experts", args.num_experts),
                                   ("dcsm_text_length", args.dcsm_text_length)) if v is not None}
    manifest = add_random_heads(args.model_dir, seed=args.seed, **overrides)
    print(json.dumps(manifest.config.to_dict()))
    return 0


def cmd_export(args) -> int:
    _export_package()
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
    _export_package()
    from clipmatch_export.train.clip_trainer import train_clip
    from clipmatch_export.train.configs import ClipTrainConfig

    out = train_clip(_records(args), args.out_dir, _config_from(args, ClipTrainConfig), init=args.init,
                     skip_bad=args.skip_bad)
    print(f"CLIP checkpoint written to {out}")
    return 0


def cmd_train_heads(args) -> int:
    _export_package()
    from clipmatch_export.train.configs import HeadsTrainConfig
    from clipmatch_export.train.heads_trainer import train_heads

    manifest = train_heads(_records(args), args.model_dir, _config_from(args, HeadsTrainConfig),
                           stages=args.stages.split(","))
    print(f"heads written next to {args.model_dir}: {json.dumps(manifest.config.to_dict())}")
    return 0


def cmd_train_default(args) -> int:
    _export_package()
    from clipmatch_export.train.default_model import DefaultRecipe, build_default_model

    build_default_model(args.out, args.data, DefaultRecipe(seed=args.seed, train_size=args.train_size))
    return 0


def _labelled_eval(args) -> int:
    import tempfile

    from .explainers import KnowledgeBaseExplainer
    from .labelled import evaluate_labelled, format_table, open_gallery, read_labelled
    from .local import Local
    from .search import Searcher

    kb = KnowledgeBaseExplainer(args.kb) if args.kb else None
    queries = read_labelled(args.data, knowledge_base=kb)
    model = Path(args.model)
    with tempfile.TemporaryDirectory(prefix="clipmatch-eval-") as tmp:
        if (model / "clipmatch_export.json").is_file():  # an export: no PyTorch needed
            matcher = Local(model)
        else:
            _export_package()
            from clipmatch_export.exporter import export_model, ExportOptions

            matcher = Local(export_model(model, Path(tmp) / "export", ExportOptions(fp16=False)).out_dir)
        index = open_gallery(matcher, args.gallery, queries, tmp)
        result = evaluate_labelled(Searcher(matcher, index), queries, args.shortlist or 100)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_eval(args) -> int:
    from .local import Local

    if args.data is not None:
        return _labelled_eval(args)
    _export_package()
    from clipmatch_export.evaluate import EvalConfig, evaluate, format_markdown, write_json
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
    _export_package()
    from clipmatch_export.fusion_fit import FusionFitConfig, fit_model_fusion, format_fit

    if args.data is not None:
        from clipmatch_export.fusion_fit import fit_labelled_fusion

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


def cmd_rank(args) -> int:
    from .local import Local

    matcher = Local(args.export_dir)
    result = matcher.rescore(args.query, args.images, explanation=args.explanation)
    rows = []
    for rank, i in enumerate(result.order(args.by), 1):
        row = {"rank": rank, "image": args.images[i], "cosine": float(result.cosine[i])}
        for name in ("match_prob", "entity_score", "dcsm"):
            scores = getattr(result, name)
            if scores is not None:
                row[name] = float(scores[i])
        rows.append(row)
    if args.json:
        print(json.dumps({"query": args.query, "truncated": result.truncated, "results": rows}, indent=2))
    else:
        from .demo import format_table

        print(format_table(rows))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(workdir=args.workdir, repeats=args.repeats, tiny=args.tiny)


def _load_configs(locations):
    """The training configs, when the PyTorch side is installed (else `train` explains what is missing)."""
    import importlib

    try:
        return [getattr(importlib.import_module(m), name) for m, name in locations]
    except ImportError:
        return []


def cmd_index(args) -> int:
    from .gallery_index import build_index, list_images, upgrade_index
    from .local import Local

    if args.upgrade is not None:
        rows = upgrade_index(Local(args.export), args.upgrade)
        print(f"{args.upgrade}: " + (f"{rows} images upgraded to the current index format" if rows
                                     else "already in the current format"))
        return 0
    if args.out is None:
        raise SystemExit("clipmatch: error: --out is required (the index folder)")
    images = list_images(args.images)
    if not images:
        raise SystemExit("clipmatch: error: no images given (files or folders with .png/.jpg/... files)")
    report = build_index(Local(args.export), images, args.out, chunk=args.chunk, kind=args.kind)
    if report["upgraded"]:
        print(f"{args.out}: upgraded {report['upgraded']} images to the current index format first")
    print(f"{args.out}: {report['total']} images indexed ({report['indexed']} now, {report['already']} before), "
          f"{len(report['failed'])} unreadable")
    for f in report["failed"][:20]:
        print(f"  unreadable: {f['path']}: {f['error']}")
    return 0


def cmd_search(args) -> int:
    from dataclasses import asdict

    from .explainers import CachedExplainer, KnowledgeBaseExplainer, OpenAIExplainer
    from .gallery_index import GalleryIndex
    from .local import Local
    from .search import Searcher

    matcher = Local(args.export)
    index = GalleryIndex.open(args.index, matcher.manifest.model_identity)
    explainer = None
    if args.explain:
        if args.explain.startswith(("http://", "https://")):
            if not args.llm_model:
                raise SystemExit("clipmatch: error: --explain URL needs --llm-model NAME")
            explainer = OpenAIExplainer(args.explain, args.llm_model, clean=not args.no_clean)
        else:
            explainer = KnowledgeBaseExplainer(args.explain)
        if args.cache:
            explainer = CachedExplainer(explainer, args.cache)
    rescore = tuple(h for h in args.rescore.split(",") if h.strip())
    result = Searcher(matcher, index, explainer).search(args.query, top_k=args.top_k, shortlist=args.shortlist,
                                                        rescore=rescore)
    if args.heatmap is not None:
        from .heatmap import render_heatmap

        if not 1 <= args.heatmap_rank <= len(result.hits):
            raise SystemExit(f"clipmatch: error: --heatmap-rank must be within 1..{len(result.hits)}")
        hit = result.hits[args.heatmap_rank - 1]
        render_heatmap(matcher, hit.path, index.tokens[hit.id], result.query, args.heatmap)
        print(f"heatmap of hit {hit.rank} ({hit.path}) written to {args.heatmap}", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": result.query, "hits": [asdict(h) for h in result.hits],
                          "explanation": None if result.explanation is None else asdict(result.explanation),
                          "timings_ms": result.timings_ms, "notes": result.notes,
                          "fusion_weights": None if result.weights is None else asdict(result.weights)}, indent=2))
        return 0
    if result.explanation is not None and result.explanation.ok:
        print(f"explanation: {result.explanation.text}")
    for note in result.notes:
        print(f"note: {note}")
    from .demo import format_table

    print(format_table([{"rank": h.rank, "fused": h.fused, "cosine": h.cosine,
                         "gi-itm": "-" if h.match_prob is None else h.match_prob,
                         "dcsm": "-" if h.dcsm is None else h.dcsm, "image": h.path} for h in result.hits]))
    return 0


def cmd_repository(args) -> int:
    from .repository import Batching, RepositoryConfig, TensorrtAccelerator, write_repository
    from .repository_check import check_repository

    if args.export_dir is None and not args.check:
        raise SystemExit("clipmatch: error: give an EXPORT_DIR to write a repository from, or --check to check "
                         "the repository in --out")
    if args.export_dir is not None:
        try:
            preferred = tuple(int(x) for x in args.preferred_batch_sizes.split(",") if x.strip())
        except ValueError:
            raise SystemExit(f"clipmatch: error: --preferred-batch-sizes must be integers, got "
                             f"{args.preferred_batch_sizes!r}") from None
        try:
            batching = Batching(args.max_batch_size, not args.no_dynamic_batching, preferred, args.queue_delay_us,
                                args.max_queue_size, args.queue_timeout_us)
            accelerator = None
            if args.ort_tensorrt:
                accelerator = TensorrtAccelerator(args.ort_tensorrt.upper(), engine_cache_path=args.ort_tensorrt_cache)
            config = RepositoryConfig(args.target, args.precision, instances=args.instances,
                                      instance_kind=args.instance_kind, rescore_instances=args.rescore_instances,
                                      threads_per_model=args.threads_per_model, host_cores=args.host_cores,
                                      warmup=not args.no_warmup, tensorrt_accelerator=accelerator,
                                      default_batching=batching)
        except ValueError as exc:
            raise SystemExit(f"clipmatch: error: {exc}") from None
        names = write_repository(args.export_dir, args.out, config)
        print(f"wrote {args.target} repository {args.out}: {', '.join(names)}")
    if args.check:
        report = check_repository(args.out, gpus=args.gpus)
        print(report.summary())
        return 0 if report.ok else 1
    return 0


def cmd_serve(args) -> int:
    import signal
    import threading

    from .server import TritonServer

    server = TritonServer(args.repository, args.http_port, args.grpc_port, args.metrics_port, host=args.host,
                          backend_directory=args.backend_directory, open_admin_api=args.open_admin_api,
                          onnxruntime_pool=args.ort_pool, log_file=args.log_file, die_with_parent=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    bound = "every interface" if server.host in ("0.0.0.0", "::") else server.host
    admin = ("open to every client" if args.open_admin_api else
             "closed (shared memory, model loading, logging, trace; --open-admin-api opens them)")
    print(f"Triton is ready, serving {args.repository} (bound to {bound})\n  HTTP    {server.http_url}\n"
          f"  gRPC    {server.grpc_url}\n  metrics {server.metrics_url}\n  admin   {admin}\n"
          f"  log     {server.log_file}\nCtrl-C or SIGTERM stops it.", flush=True)
    try:
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                print(f"clipmatch: error: tritonserver exited with code {server.process.returncode}:\n"
                      f"{server.log_tail()}", file=sys.stderr)
                return 1
    finally:
        code = server.stop()
    print(f"stopped (tritonserver exit code {code})")
    return 0


def _labelled_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", type=Path, default=None,
                   help="labelled queries over your own gallery (JSONL: query, relevant, optional explanation or "
                        "entity; see the README) instead of the synthetic split")
    s.add_argument("--gallery", type=Path, default=None,
                   help="with --data: an index folder, or a folder of images (default: the images the queries name)")
    s.add_argument("--kb", type=Path, default=None, help="with --data: knowledge base for 'entity' fields")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipmatch", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

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
    from_export = ("clipmatch_export.train.configs", "ClipTrainConfig"), \
        ("clipmatch_export.train.configs", "HeadsTrainConfig")
    configs = _load_configs(from_export)
    t = train.add_parser("clip", help="contrastive training: from scratch, or fine-tuning --init MODEL_DIR")
    t.add_argument("data", type=Path, help="JSONL: image, caption, optional explanation and hard negatives")
    t.add_argument("out_dir", type=Path)
    t.add_argument("--init", type=Path, default=None, help="a CLIP checkpoint folder to fine-tune")
    if configs:
        _config_args(t, configs[0])
    t.set_defaults(func=cmd_train_clip)
    t = train.add_parser("heads", help="DCSM and MMAE/GI-ITM on the frozen towers of MODEL_DIR")
    t.add_argument("data", type=Path)
    t.add_argument("model_dir", type=Path)
    t.add_argument("--stages", default="dcsm,entity")
    if configs:
        _config_args(t, configs[1])
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

    s = sub.add_parser("repository", help="write (and check) a Triton model repository for an export")
    s.add_argument("export_dir", type=Path, nargs="?", default=None,
                   help="the export to serve; without it, --check checks the repository in --out")
    s.add_argument("--target", choices=["onnxruntime", "tensorrt", "python"], default="onnxruntime",
                   help="onnxruntime / tensorrt: Triton's native backends (NVIDIA's container); "
                        "python: `clipmatch serve` without a native backend")
    s.add_argument("--out", type=Path, default=Path("triton_models"))
    s.add_argument("--check", action="store_true",
                   help="check the repository as the server will (config against graph, instance kinds, "
                        "ensembles, versions); exit 1 on any problem")
    s.add_argument("--gpus", type=int, default=None, help="GPUs of the serving host, for --check (default: this "
                                                          "machine's)")
    s.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="which ONNX graphs to serve")
    s.add_argument("--max-batch-size", type=int, default=64)
    s.add_argument("--preferred-batch-sizes", default="8,16,32", help="comma-separated")
    s.add_argument("--queue-delay-us", type=int, default=100, help="dynamic batching queue delay")
    s.add_argument("--max-queue-size", type=int, default=0,
                   help="requests waiting per model before new ones are refused (back-pressure; 0: unbounded; "
                        "see the README for tritonserver 2.51's stalls with it)")
    s.add_argument("--queue-timeout-us", type=int, default=0, help="refuse a request queued this long (0: never)")
    s.add_argument("--no-dynamic-batching", action="store_true")
    s.add_argument("--no-warmup", action="store_true", help="no warmup requests when a model loads")
    s.add_argument("--instances", type=int, default=1, help="instances of each model")
    s.add_argument("--rescore-instances", type=int, default=None, help="instances of the rescore model")
    s.add_argument("--instance-kind", choices=["KIND_AUTO", "KIND_CPU", "KIND_GPU"], default=None,
                   help="default: KIND_AUTO (onnxruntime), KIND_GPU (tensorrt), KIND_CPU (python)")
    s.add_argument("--threads-per-model", type=int, default=None,
                   help="onnxruntime intra-op threads per model instance (default: host cores / models)")
    s.add_argument("--host-cores", type=int, default=None, help="cores of the serving host (default: this machine's)")
    s.add_argument("--ort-tensorrt", nargs="?", const="fp16", choices=["fp16", "fp32"], default=None,
                   help="onnxruntime target on GPU hosts: run the graphs through onnxruntime's TensorRT provider")
    s.add_argument("--ort-tensorrt-cache", default=None, help="engine cache folder on the server for --ort-tensorrt")
    s.set_defaults(func=cmd_repository)

    s = sub.add_parser("serve", help="run a real Triton server here (nvidia-pytriton) until Ctrl-C / SIGTERM")
    s.add_argument("--repository", type=Path, default=Path("triton_models"),
                   help="a model repository (clipmatch repository EXPORT); the python target needs no other backend")
    s.add_argument("--host", default="127.0.0.1", help="address every endpoint binds (0.0.0.0: every interface)")
    s.add_argument("--backend-directory", default=None,
                   help="folder of native backends (onnxruntime/, tensorrt/) built for Triton 2.51; "
                        "default $CLIPMATCH_TRITON_BACKENDS")
    s.add_argument("--ort-pool", type=int, default=None, metavar="THREADS",
                   help="native onnxruntime backend: one thread pool shared by every model (pays for large models)")
    s.add_argument("--open-admin-api", action="store_true",
                   help="open the shared-memory, model-repository, logging and trace APIs to every client")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--log-file", type=Path, default=None)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("index", help="encode a gallery into a searchable index (resumable; adds to an existing one)")
    s.add_argument("images", nargs="*", help="image files or folders")
    s.add_argument("--out", type=Path, default=None, help="the index folder")
    s.add_argument("--upgrade", type=Path, default=None, metavar="INDEX",
                   help="bring an index of an older format up to date, in place, and stop")
    s.add_argument("--export", type=Path, default=Path(os.environ.get("CLIPMATCH_EXPORT", "exports/default")),
                   help="the export to encode with (default $CLIPMATCH_EXPORT or exports/default)")
    s.add_argument("--kind", choices=["flat", "ivf"], default=None,
                   help="FAISS index: exact below 50k images, IVF above, unless given")
    s.add_argument("--chunk", type=int, default=256, help="images per committed chunk")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="search an index: explanation, cosine shortlist, rescoring, fused ranking")
    s.add_argument("index", type=Path)
    s.add_argument("query")
    s.add_argument("--export", type=Path, default=Path(os.environ.get("CLIPMATCH_EXPORT", "exports/default")),
                   help="the export the index was built with (default $CLIPMATCH_EXPORT or exports/default)")
    s.add_argument("--explain", default=None,
                   help="a knowledge base (.json / .jsonl) or an OpenAI-compatible base URL (http://.../v1)")
    s.add_argument("--llm-model", default=None, help="model name at the --explain URL")
    s.add_argument("--no-clean", action="store_true",
                   help="keep the --explain URL's answers as given, not cut to the look they describe")
    s.add_argument("--cache", type=Path, default=None, help="SQLite explanation cache (default: none)")
    s.add_argument("--rescore", default="itm,dcsm", help="heads to rescore with: itm, dcsm, both, or ''")
    s.add_argument("--top-k", type=int, default=10)
    s.add_argument("--shortlist", type=int, default=100)
    s.add_argument("--json", action="store_true")
    s.add_argument("--heatmap", type=Path, default=None, help="write the DCSM map of one hit over its image (PNG)")
    s.add_argument("--heatmap-rank", type=int, default=1, help="which hit --heatmap draws")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("rank", help="rank images for a query with cosine and every head")
    s.add_argument("export_dir", type=Path)
    s.add_argument("images", nargs="+")
    s.add_argument("-q", "--query", required=True)
    s.add_argument("--explanation", default=None, help="what the query names looks like")
    s.add_argument("--by", default="cosine", choices=["cosine", "match_prob", "entity_score", "dcsm"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_rank)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClipmatchError as exc:
        print(f"clipmatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
