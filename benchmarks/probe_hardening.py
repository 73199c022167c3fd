"""A probe of hostile and careless inputs, class by class: how many were tried, and how many
crashed (an exception that is not a clipmatch error), hung (over 30 s), or gave a silently
wrong result (an image lost or indexed twice, a score that is not finite).

    python benchmarks/probe_hardening.py [--export DIR] [--scale 1.0]

Everything runs on loopback and in a temporary folder; the process caps its own memory
(RLIMIT_AS, 6 GiB) so that an input that would exhaust it is counted as a crash, not a
dead machine.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

import clipmatch
from clipmatch.errors import ClipmatchError
from clipmatch.explain.explainers import CachedExplainer, KnowledgeBaseExplainer, OpenAIExplainer
from clipmatch.inputs.images import load_image
from clipmatch.results import ImageEncoding, TextEncoding
from clipmatch.retrieval.index import GalleryIndex, build_index
from clipmatch.serving.repository import RepositoryConfig, write_repository

HANG_S = 30.0


class Tally:
    def __init__(self):
        self.rows: dict[str, Counter] = {}

    def run(self, cls: str, fn, check=None) -> None:
        """One input: ok / clipmatch error / crash / hang / wrong (check(result) False)."""
        c = self.rows.setdefault(cls, Counter())
        c["tried"] += 1
        box: dict = {}

        def target():
            try:
                box["result"] = fn()
            except ClipmatchError:
                box["error"] = True
            except BaseException as exc:  # noqa: BLE001 - what the probe counts
                box["crash"] = f"{type(exc).__name__}: {str(exc)[:120]}"

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(HANG_S)
        if t.is_alive():
            c["hangs"] += 1
        elif "crash" in box:
            c["crashes"] += 1
            c.setdefault("examples", [])
            if len(c["examples"]) < 3:
                c["examples"].append(box["crash"])
        elif "error" in box:
            c["clipmatch errors"] += 1
        elif check is not None and not check(box.get("result")):
            c["wrong"] += 1
        else:
            c["ok"] += 1

    def table(self) -> str:
        cols = ["tried", "ok", "clipmatch errors", "crashes", "hangs", "wrong"]
        lines = ["| class | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for cls, c in self.rows.items():
            lines.append(f"| {cls} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |")
        for cls, c in self.rows.items():
            for e in c.get("examples", []):
                lines.append(f"  {cls} crash: {e}")
        return "\n".join(lines)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def probe_images(t: Tally, m, rng: random.Random, n: int, tmp: Path) -> None:
    seeds = [png(Image.new("RGB", (16, 16), (1, 2, 3))), png(Image.new("RGB", (16, 16)), "JPEG"),
             png(Image.new("RGB", (16, 16)), "GIF"), png(Image.new("RGB", (16, 16)), "BMP"),
             png(Image.new("RGB", (16, 16)), "TIFF"), png(Image.new("RGB", (16, 16)), "WEBP")]
    for _ in range(n):
        base = rng.choice(seeds)
        kind = rng.randrange(5)
        if kind == 0:
            item = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        elif kind == 1:
            item = base[:rng.randrange(len(base))]
        elif kind == 2:
            i = rng.randrange(len(base))
            item = base[:i] + bytes([rng.randrange(256)]) + base[i + 1:]
        elif kind == 3:
            dtype = rng.choice([np.uint8, np.uint16, np.float32, np.float64, np.int64, np.bool_])
            shape = tuple(rng.randrange(0, 7) for _ in range(rng.randrange(1, 5)))
            item = (np.random.default_rng(rng.randrange(1 << 30)).random(shape) * rng.choice([1, 255, 70000])
                    ).astype(dtype)
        else:
            w, h = rng.choice([(2, 1_000_000), (1_000_000, 2), (9000, 9000), (3, 3), (1, 50)])
            item = png(Image.new("1", (w, h)))
            if rng.random() < 0.3:  # a palette PCX cut short
                item = png(Image.new("P", (16, 16)), "PCX")[:-rng.randrange(1, 800)]
        t.run("images", lambda item=item: m.encode_images([item]),
              lambda r: np.isfinite(r.embeds).all())
    fifo = tmp / "fifo.png"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero", "/dev/urandom", "/proc/self/mem", str(tmp)):
        t.run("images", lambda path=path: load_image(path, 0))


def probe_texts(t: Tally, m, rng: random.Random, n: int) -> None:
    alphabet = [chr(c) for c in (*range(32, 127), 0x0, 0x1b, 0x7f, 0xad, 0x200b, 0x202e, 0xd800, 0xdc80, 0xdfff,
                                 0xfeff, 0x1f600, 0x10ffff)]
    for _ in range(n):
        size = rng.choice([0, 1, 5, 40, 400, 20_000, 1_000_000])
        text = "".join(rng.choice(alphabet) for _ in range(min(size, 2000)))
        if size > 2000:
            text = text * (size // max(1, len(text)))
        t.run("texts", lambda text=text: m.encode_texts([text]), lambda r: np.isfinite(r.embeds).all())


def probe_arrays(t: Tally, m, rng: random.Random, n: int) -> None:
    d, p = m.manifest.sizes["embed_dim"], m.manifest.sizes["num_image_tokens"]
    g = np.random.default_rng(rng.randrange(1 << 30))

    def junk(shape, dtype=np.float32):
        x = g.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind == "f" else g.integers(-1, 3, shape)
        if rng.random() < 0.2 and np.dtype(dtype).kind == "f" and x.size:
            x.flat[rng.randrange(x.size)] = rng.choice([np.nan, np.inf])
        return x.astype(dtype)

    for _ in range(n):
        k, tl = rng.randrange(1, 5), rng.randrange(1, 8)
        dd = rng.choice([d, d, d + 1])
        pp = rng.choice([p, p, p - 1])

        def case(k=k, tl=tl, dd=dd, pp=pp):
            text = TextEncoding(("q",), junk((1, dd)), junk((1, tl, d)), junk((1, tl), np.int64),
                                junk((1, tl), np.int64), np.zeros(1, bool))
            return m.rescore(text, ImageEncoding(junk((k, d)), junk((k, pp, d))))

        t.run("encodings", case, lambda r: all(s is None or np.isfinite(s).all()
                                               for s in (r.cosine, r.match_prob, r.dcsm)))


def probe_index(t: Tally, m, rng: random.Random, n: int, tmp: Path, export: Path) -> None:
    paths = []
    for i in range(24):
        path = tmp / "g" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    build_index(m, paths[:12], tmp / "base", progress=False)
    names = ["index.json", "images.jsonl", "embeds.f32", "tokens.f16", "experts.f32", "faiss.index"]
    for j in range(n):
        root = tmp / f"idx{j}"
        shutil.copytree(tmp / "base", root)
        target = root / rng.choice(names)
        data = target.read_bytes()
        cut = rng.randrange(len(data) + 1)
        how = rng.randrange(4)
        if how == 0:
            target.write_bytes(data[:cut])
        elif how == 1:
            target.write_bytes(data + os.urandom(rng.randrange(1, 99)))
        elif how == 2:
            target.unlink()
        else:
            target.write_bytes(data[:cut] + os.urandom(8) + data[cut + 8:])

        def case(root=root):
            try:
                idx = GalleryIndex.open(root, m.manifest.model_identity)
                _, ids = idx.search(np.asarray(idx.embeds[:1]), 4)
                idx.rows(ids[0][ids[0] >= 0])
            except ClipmatchError:
                pass
            build_index(m, paths, root, progress=False)
            return GalleryIndex.open(root)

        # Adding must end with every image once (or a clipmatch error): nothing lost, nothing twice.
        t.run("index files", case, lambda idx: sorted(idx.paths) == sorted(paths) and len(set(idx.paths)) == 24)
    for j in range(n // 10):  # two writers at once, and kills at random points
        out = tmp / f"conc{j}"
        cmd = [sys.executable, "-m", "clipmatch.cli", "index", str(tmp / "g"), "--out", str(out), "--export",
               str(export), "--chunk", "4"]

        def case(cmd=cmd, out=out):
            a = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            b = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.random() * 2)
            a.send_signal(signal.SIGKILL)
            a.wait()
            b.wait(120)
            subprocess.run(cmd, capture_output=True, timeout=120, check=True)
            return [json.loads(x)["path"] for x in (out / "images.jsonl").read_text().splitlines()]

        t.run("concurrent writers and kills", case, lambda rows: sorted(rows) == sorted(paths) and len(rows) == 24)


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        what = body["messages"][-1]["content"].rsplit("Query: ", 1)[-1].split()[0]
        if what == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "9999")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)
            return
        if what == "silent":
            time.sleep(3)
        payload = {"flood": b" " * (3 << 20), "gzip": gzip.compress(b"0" * (32 << 20))}.get(what)
        headers = {"Content-Encoding": "gzip"} if what == "gzip" else {}
        status = 500 if what == "error" else 200
        if payload is None:
            content = {"parts": [{"type": "text", "text": "a red star"}], "number": 7, "dict": {"a": 1},
                       "null": None, "escape": "a red \x1b[2J star", "long": "a red star. " * 40_000,
                       "echo": self.headers.get("Authorization", "")}.get(what, "a red star")
            payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def probe_explainers(t: Tally, rng: random.Random, n: int, tmp: Path) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    httpd.daemon_threads = True
    httpd.handle_error = lambda *args: None  # a client that gave up mid-answer is the point, not news
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://user:secret-pw@127.0.0.1:{httpd.server_address[1]}/v1"
    os.environ["OPENAI_API_KEY"] = "sk-probe-secret"
    e = OpenAIExplainer(url, "m", timeout_s=2.0, retries=2, backoff_s=0.05)
    kinds = ["drip", "silent", "flood", "gzip", "error", "parts", "number", "dict", "null", "escape", "long",
             "echo", "fine"]

    def clean(x):  # no secret, no escape code, within the deadline
        shown = f"{x.text} {x.error} {x.note} {x.source}"
        return "secret" not in shown and "\x1b" not in shown

    for _ in range(n):
        kind = rng.choice(kinds)
        t.run("explainers", lambda kind=kind: e.explain(f"{kind} thing"), clean)
    for damage in ("corrupt", "dir", "fifo"):
        path = tmp / f"cache-{damage}.sqlite"
        if damage == "corrupt":
            path.write_bytes(os.urandom(4096))
        elif damage == "dir":
            path.mkdir()
        else:
            os.mkfifo(path)
        kb = KnowledgeBaseExplainer({"Orrin pump": "a green star"})
        t.run("explainers", lambda path=path, kb=kb: CachedExplainer(kb, path).explain("the Orrin pump"),
              lambda x: x.text == "a green star" and x.note)
    for content in (b"[1, 2]", b'{"a": 5}', b"\xff\xfe", b'{"": "x"}', b'{"entity": null}'):
        path = tmp / f"kb{len(content)}.json"
        path.write_bytes(content)
        t.run("explainers", lambda path=path: KnowledgeBaseExplainer(path))
    httpd.shutdown()


def probe_folders(t: Tally, m, tmp: Path, export: Path) -> None:
    for name in ("../../etc/passwd", "/etc/passwd", "fp16/../../x", ""):
        copy = tmp / f"export-{abs(hash(name))}"
        shutil.copytree(export, copy)
        manifest = json.loads((copy / "clipmatch_export.json").read_text())
        manifest["components"]["dcsm"]["fp32"] = name
        (copy / "clipmatch_export.json").write_text(json.dumps(manifest))
        t.run("crafted folders", lambda copy=copy: write_repository(copy, copy / "repo", RepositoryConfig(target="python")),
              lambda _: False)  # any success here is wrong: a file outside the export was named
    victim = tmp / "victim"
    for name in ("tokens.f16", "images.jsonl", ".lock", "index.json.tmp", "embeds.f32"):
        victim.write_bytes(b"precious")
        root = tmp / f"sym-{name}"
        root.mkdir()
        os.symlink(victim, root / name)
        t.run("crafted folders", lambda root=root: build_index(m, [str(tmp / "g" / "000.png")], root, progress=False),
              lambda _: victim.read_bytes() == b"precious")
    # An images.jsonl edited to name other files: the index must not open them (the heatmap's path).
    build_index(m, [str(tmp / "g" / "000.png")], tmp / "named", progress=False)
    for path in ("/dev/zero", "/etc/hostname", str(tmp / "fifo.png"), str(tmp / "g" / "001.png")):
        log = tmp / "named" / "images.jsonl"
        entry = json.loads(log.read_text())
        entry["path"] = path
        log.write_text(json.dumps(entry) + "\n")
        t.run("crafted folders", lambda: GalleryIndex.open(tmp / "named").image_path(0), lambda _: False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", type=Path, default=None, help="an export (default: the tiny model, built here)")
    p.add_argument("--scale", type=float, default=1.0, help="inputs per class, relative to the default counts")
    p.add_argument("--seed", type=int, default=20261201)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, hard))
    rng = random.Random(args.seed)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="clipmatch-probe-") as tmp_name:
        tmp = Path(tmp_name)
        export = args.export
        if export is None:
            from clipmatch_export.exporter import ExportOptions, export_model
            from clipmatch_export.tiny import add_random_heads, build_tiny_clip

            model = build_tiny_clip(tmp / "model", seed=0)
            add_random_heads(model, seed=0, num_experts=2, dcsm_text_length=16)
            export = export_model(model, tmp / "export", ExportOptions(fp16=False)).out_dir
        m = clipmatch.Local(export, intra_op_threads=1)
        s = args.scale
        t0 = time.perf_counter()
        probe_images(tally, m, rng, int(1500 * s), tmp)
        probe_texts(tally, m, rng, int(1500 * s))
        probe_arrays(tally, m, rng, int(400 * s))
        probe_index(tally, m, rng, int(200 * s), tmp, export)
        probe_explainers(tally, rng, int(60 * s), tmp)
        probe_folders(tally, m, tmp, export)
        print(tally.table())
        print(f"({time.perf_counter() - t0:.0f} s)")
    bad = sum(c.get(k, 0) for c in tally.rows.values() for k in ("crashes", "hangs", "wrong"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
