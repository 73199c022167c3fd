"""An OpenAI-compatible endpoint that drips, floods, gzips, echoes the key or answers in content parts,
on loopback: every call ends by its deadline with a clear result, and no secret is shown."""
from __future__ import annotations

import gzip
import json
import sqlite3
import time
from http.server import BaseHTTPRequestHandler

import pytest

from clipmatch.explain.explainers import MAX_RESPONSE_BYTES, CachedExplainer, KnowledgeBaseExplainer, OpenAIExplainer

from .loopback import LoopbackEndpoint, send

LOOK = "The Orrin pump is a green star with purple checks."


class Hostile(LoopbackEndpoint):
    """Each request's query picks a behaviour; ``calls`` counts requests per query."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                query = body["messages"][-1]["content"].rsplit("Query: ", 1)[-1]
                server.calls[query] = server.calls.get(query, 0) + 1
                key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if query == "drip":  # a byte every 0.2 s, for ever
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(200):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                if query == "silent":
                    time.sleep(5)
                    return self._json({"choices": [{"message": {"content": LOOK}}]})
                if query == "flood":
                    return send(self, 200, b" " * (MAX_RESPONSE_BYTES + 10))
                if query == "gzip bomb":  # 4 MB of zeros from a few KB
                    return send(self, 200, gzip.compress(b"0" * (4 * 2**20)), {"Content-Encoding": "gzip"})
                content = {"parts": [{"type": "text", "text": "The Orrin pump is"},
                                     {"type": "text", "text": "a green star with purple checks."}],
                           "number": 42, "dict": {"text": LOOK},
                           "escapes": "The Orrin pump is a green star \x1b[2J\x1b]0;pwned\x07with purple checks.",
                           "echo": f"The Orrin pump is a green star with purple checks {key}",
                           "long": LOOK + " It is old." * 30_000}.get(query, LOOK)
                if query == "echo error":
                    return send(self, 400, f"bad key {key}".encode())
                return self._json({"choices": [{"message": {"content": content}}]})

            def _json(self, obj):
                send(self, 200, json.dumps(obj).encode())

        self._serve(Handler)


@pytest.fixture()
def hostile():
    s = Hostile()
    yield s
    s.close()


def test_a_dripping_or_silent_server_ends_the_call_by_its_deadline_and_is_asked_once(hostile):
    e = OpenAIExplainer(hostile.base_url, "m", timeout_s=1.0, retries=3, backoff_s=0.01)
    for query in ("drip", "silent"):
        t = time.perf_counter()
        got = e.explain(query)
        assert time.perf_counter() - t < 2.5, query  # 1 s deadline, not a per-read timeout
        assert not got.ok and "timed out" in got.error
        assert hostile.calls[query] == 1  # a timed-out call is not sent again


def test_floods_and_compression_bombs_are_cut_off_at_the_size_cap(hostile):
    e = OpenAIExplainer(hostile.base_url, "m", timeout_s=10)
    for query in ("flood", "gzip bomb"):
        got = e.explain(query)
        assert not got.ok and f"more than {MAX_RESPONSE_BYTES:,} bytes" in got.error, (query, got.error)


def test_content_parts_are_read_and_other_content_is_a_clear_failure(hostile):
    e = OpenAIExplainer(hostile.base_url, "m", timeout_s=10)
    assert e.explain("parts").text == "The Orrin pump is a green star with purple checks"
    for query in ("number", "dict"):
        got = e.explain(query)
        assert not got.ok and "malformed completion (TypeError)" in got.error


def test_keys_never_show_and_escape_codes_never_reach_a_terminal(hostile, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    e = OpenAIExplainer(hostile.base_url.replace("http://", "http://user:pw-456@"), "m", timeout_s=10)
    assert "pw-456" not in e.identity and "sk-secret" not in e.identity
    assert "sk-secret-123" not in (e.explain("echo").text or "")
    err = e.explain("echo error").error
    assert "bad key Basic ***" in err and "sk-secret" not in err and "pw-456" not in err and "dXNlcjpwdy00NTY" not in err
    text = e.explain("escapes").text
    assert "\x1b" not in text and "\x07" not in text and "green star" in text


def test_a_very_long_answer_is_cut_before_cleaning(hostile):
    t = time.perf_counter()
    got = OpenAIExplainer(hostile.base_url, "m", timeout_s=20).explain("long")
    assert time.perf_counter() - t < 5 and got.text == "The Orrin pump is a green star with purple checks"


@pytest.mark.parametrize("damage", ["corrupt", "read_only", "locked"])
def test_an_unusable_cache_runs_uncached_with_a_note(tmp_path, damage):
    kb = KnowledgeBaseExplainer({"Orrin pump": "a green star with purple checks"})
    path = tmp_path / "cache" / "explanations.sqlite"
    path.parent.mkdir()
    holder = None
    if damage == "corrupt":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "read_only":
        CachedExplainer(kb, path).close()
        path.chmod(0o444)
        path.parent.chmod(0o555)
    else:
        CachedExplainer(kb, path).close()
        holder = sqlite3.connect(path)
        holder.execute("BEGIN EXCLUSIVE")
    try:
        cached = CachedExplainer(kb, path)
        got = cached.explain("the Orrin pump")
        if damage == "read_only" and got.note is None:
            pytest.skip("running as a user that writes read-only files (root)")
        assert got.text == "a green star with purple checks"
        assert got.note and "is unusable" in got.note and "explaining without it" in got.note
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
        path.parent.chmod(0o755)
