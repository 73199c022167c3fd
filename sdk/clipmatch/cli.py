"""The ``clipmatch`` command.

The SDK's own commands (no torch): index, search, rank, repository, serve.
The PyTorch side adds demo, tiny, init-heads, export, train, eval and fit-fusion
through the ``clipmatch.commands`` entry point (``clipmatch_export.cli``); run
without it installed, they say which extra to install.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from clipmatch import __version__
from clipmatch.contract import HEAD_NAMES as SEARCH_HEADS
from clipmatch.errors import ClipmatchError
from clipmatch.results import format_table
from clipmatch.retrieval.index import DEFAULT_CHUNK
from clipmatch.retrieval.search import Searcher
from clipmatch.serving.repository import TARGETS, Batching, RepositoryConfig

# Flag defaults are the config objects' defaults: stated once, there.
_REPO, _BATCHING = RepositoryConfig(), Batching()
_SEARCH = inspect.signature(Searcher.search).parameters

# Other packages add commands by naming a function register(subparsers) in this group.
COMMANDS_ENTRY_POINT = "clipmatch.commands"


def cmd_rank(args) -> int:
    from clipmatch.backends.local import Local

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
        print(format_table(rows))
    return 0


def cmd_index(args) -> int:
    from clipmatch.backends.local import Local
    from clipmatch.retrieval.index import build_index, list_images, upgrade_index

    if args.verify is not None:
        from clipmatch.retrieval.index_files import verify_index

        report = verify_index(args.verify)
        print(f"{args.verify}: {report['checked']} of {report['rows']} rows checked against their CRC, "
              f"{len(report['bad'])} damaged" + (f": rows {report['bad'][:20]}" if report["bad"] else ""))
        return 1 if report["bad"] else 0
    if args.upgrade is not None:
        rows = upgrade_index(Local(args.export), args.upgrade)
        print(f"{args.upgrade}: " + (f"{rows} images upgraded to the current index format" if rows
                                     else "already in the current format"))
        return 0
    if args.out is None:
        raise SystemExit("clipmatch: error: --out is required (the index folder)")
    images = list_images(args.images)
    if not images and not (args.out / "index.json").is_file():
        raise SystemExit("clipmatch: error: no images given (files or folders with .png/.jpg/... files)")
    # No images for an existing index: finish it (a stopped run's committed rows go into FAISS).
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

    from clipmatch.backends.local import Local
    from clipmatch.explain.explainers import CachedExplainer, KnowledgeBaseExplainer, OpenAIExplainer
    from clipmatch.retrieval.index import GalleryIndex
    from clipmatch.retrieval.search import Searcher

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
        from clipmatch.retrieval.heatmap import render_heatmap

        if not 1 <= args.heatmap_rank <= len(result.hits):
            raise SystemExit(f"clipmatch: error: --heatmap-rank must be within 1..{len(result.hits)}")
        hit = result.hits[args.heatmap_rank - 1]
        render_heatmap(matcher, index.image_path(hit.id), index.tokens[hit.id], result.query, args.heatmap)
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
    print(format_table([{"rank": h.rank, "fused": h.fused, "cosine": h.cosine,
                         "match_prob": "-" if h.match_prob is None else h.match_prob,
                         "dcsm": "-" if h.dcsm is None else h.dcsm, "image": h.path} for h in result.hits]))
    return 0


def cmd_repository(args) -> int:
    from clipmatch.serving.repository import Batching, RepositoryConfig, TensorrtAccelerator, write_repository
    from clipmatch.serving.repository_check import check_repository

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

    from clipmatch.serving.server import TritonServer

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


def _plugin_commands(sub: argparse._SubParsersAction) -> list[str]:
    """Add the commands other installed packages register (the PyTorch side's, first of all);
    the ones that cannot load are named, not fatal: the SDK's own commands still run."""
    failed = []
    for entry in metadata.entry_points(group=COMMANDS_ENTRY_POINT):
        try:
            register = entry.load()
        except ImportError as exc:
            failed.append(f"{entry.name} ({exc})")
            continue
        register(sub)
    return failed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipmatch", description="image-text matching: index, search, rescore, "
                                                             "export and serve CLIP models")
    p.add_argument("--version", action="version", version=f"clipmatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    failed = _plugin_commands(sub)
    if failed:
        p.epilog = (f"Commands of {', '.join(failed)} are unavailable; the PyTorch side's (export, train, eval, "
                    "demo, ...) come with pip install 'clipmatch[export,cpu]'.")

    s = sub.add_parser("repository", help="write (and check) a Triton model repository for an export")
    s.add_argument("export_dir", type=Path, nargs="?", default=None,
                   help="the export to serve; without it, --check checks the repository in --out")
    s.add_argument("--target", choices=TARGETS, default=_REPO.target,
                   help="onnxruntime / tensorrt: Triton's native backends (NVIDIA's container); "
                        "python: `clipmatch serve` without a native backend")
    s.add_argument("--out", type=Path, default=Path("triton_models"))
    s.add_argument("--check", action="store_true",
                   help="check the repository as the server will (config against graph, instance kinds, "
                        "ensembles, versions); exit 1 on any problem")
    s.add_argument("--gpus", type=int, default=None, help="GPUs of the serving host, for --check (default: this "
                                                          "machine's)")
    s.add_argument("--precision", choices=["fp32", "fp16"], default=_REPO.precision, help="which ONNX graphs to serve")
    s.add_argument("--max-batch-size", type=int, default=_BATCHING.max_batch_size)
    s.add_argument("--preferred-batch-sizes", default=",".join(map(str, _BATCHING.preferred_sizes)), help="comma-separated")
    s.add_argument("--queue-delay-us", type=int, default=_BATCHING.max_queue_delay_us, help="dynamic batching queue delay")
    s.add_argument("--max-queue-size", type=int, default=_BATCHING.max_queue_size,
                   help="requests waiting per model before new ones are refused (back-pressure; 0: unbounded; "
                        "see the README for tritonserver 2.51's stalls with it)")
    s.add_argument("--queue-timeout-us", type=int, default=_BATCHING.queue_timeout_us,
                   help="refuse a request queued this long (0: never)")
    s.add_argument("--no-dynamic-batching", action="store_true")
    s.add_argument("--no-warmup", action="store_true", help="no warmup requests when a model loads")
    s.add_argument("--instances", type=int, default=_REPO.instances, help="instances of each model")
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
                   help="native onnxruntime backend: one thread pool shared by every model (see the README for when it pays)")
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
    s.add_argument("--verify", type=Path, default=None, metavar="INDEX",
                   help="check every row against the checksum it was committed with, and stop (exit 1: damage)")
    s.add_argument("--upgrade", type=Path, default=None, metavar="INDEX",
                   help="bring an index of an older format up to date, in place, and stop")
    s.add_argument("--export", type=Path, default=Path(os.environ.get("CLIPMATCH_EXPORT", "exports/default")),
                   help="the export to encode with (default $CLIPMATCH_EXPORT or exports/default)")
    s.add_argument("--kind", choices=["flat", "ivf"], default=None,
                   help="FAISS index: exact below 50k images, IVF above, unless given")
    s.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="images per committed chunk")
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
    s.add_argument("--rescore", default=",".join(SEARCH_HEADS), help="heads to rescore with, comma-separated: "
                   + ", ".join(SEARCH_HEADS) + ", or '' for cosine alone")
    s.add_argument("--top-k", type=int, default=_SEARCH["top_k"].default)
    s.add_argument("--shortlist", type=int, default=_SEARCH["shortlist"].default)
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
