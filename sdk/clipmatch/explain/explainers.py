"""Explanations of a query: what the thing it names looks like, for the entity heads to read.

One small interface, three sources:

- ``KnowledgeBaseExplainer``: entity -> description from a JSON or JSONL
  file; finds the entity mentioned in the query, exactly or ignoring case
  and punctuation. The embedded default.
- ``OpenAIExplainer``: any OpenAI-compatible chat-completions endpoint (vLLM,
  Ollama, TGI, a hosted API), over httpx.
- ``TransformersExplainer``: a local causal LM from a folder (needs transformers).

``CachedExplainer`` wraps any of them with a SQLite cache keyed by the text
and the explainer's identity (source, model, prompt), so each explanation is
made once.

Failure policy: an explainer never loses the query. A failed or empty
explanation comes back as ``Explanation(text=None, error=...)``; search goes on
without it and its result says so. Only setting an explainer up (a missing
knowledge base, a malformed URL) raises ``ExplainerError``.

The prompt asks for the look alone, as a noun phrase, and an answer from a
language model is cut to that (``clipmatch.explain.cleaning``). An answer
that says nothing beyond the query is a settled failure (``final``): cached
like an answer, so the model is not asked again.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from clipmatch.errors import DependencyError, ExplainerError
from clipmatch.explain.cleaning import CLEANING_VERSION, clean_explanation, query_names

__all__ = [
    "Explanation", "Explainer", "KnowledgeBaseExplainer", "OpenAIExplainer", "TransformersExplainer",
    "CachedExplainer", "DEFAULT_PROMPT", "normalise", "clean_explanation", "query_names",
]

DEFAULT_PROMPT = (
    "What does the thing named in this image search query look like? Answer with one short noun phrase "
    "about its shape, colours, patterns and marks, such as \"a red cylinder with white stripes\". "
    "Do not repeat its name.\nQuery: {query}"
)


@dataclass(frozen=True)
class Explanation:
    """An explanation, or why there is none (``text`` None and ``error`` set)."""

    query: str
    text: str | None
    source: str  # which explainer (and entity, for a knowledge base) gave it
    error: str | None = None
    cached: bool = False
    final: bool = False  # a failure that asking again would not change (the answer added nothing)
    note: str | None = None  # what the caller should know besides (e.g. the cache was unusable)

    @property
    def ok(self) -> bool:
        return bool(self.text)


class Explainer(Protocol):
    identity: str  # what the cache keys on besides the query: source, model, prompt

    def explain(self, query: str) -> Explanation: ...

    def explain_many(self, queries: Sequence[str]) -> list[Explanation]: ...


def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space: how mentions are matched.

    >>> normalise("The KESTREL-7 valve!")
    'the kestrel 7 valve'
    """
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.casefold()).split())


def _one_by_one(explainer, queries: Sequence[str]) -> list[Explanation]:
    return [explainer.explain(q) for q in queries]


# -- knowledge base ------------------------------------------------------------------------------

class KnowledgeBaseExplainer:
    """Entity -> description, found by the entity's mention in the query (the longest one wins)."""

    def __init__(self, entries: Mapping[str, str] | str | Path):
        if isinstance(entries, (str, Path)):
            self.path = Path(entries)
            entries = self._read(self.path)
        else:
            self.path = None
        self.entries = {str(k): str(v) for k, v in entries.items()}
        if not self.entries:
            raise ExplainerError(f"knowledge base {self.path or '(given)'} has no entries")
        self._by_norm = {}
        for name in self.entries:
            key = normalise(name)
            if not key:
                raise ExplainerError(f"knowledge base entity {name!r} has no letters or digits")
            self._by_norm[key] = name
        digest = hashlib.sha256(json.dumps(self.entries, sort_keys=True).encode()).hexdigest()[:16]
        self.identity = f"kb:{digest}"

    @staticmethod
    def _read(path: Path) -> dict[str, str]:
        if not path.is_file():
            raise ExplainerError(f"knowledge base not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ExplainerError(f"knowledge base {path} cannot be read as UTF-8 text: {exc}") from None
        if path.suffix == ".jsonl":
            out = {}
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out[str(row["entity"])] = str(row.get("explanation") or row["description"])
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ExplainerError(f"{path}:{number}: a line must be a JSON object with 'entity' and "
                                         f"'explanation' (or 'description'): {exc}") from None
            return out
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExplainerError(f"knowledge base {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ExplainerError(f"knowledge base {path} must be a JSON object of entity -> description")
        return data

    def mention(self, query: str) -> str | None:
        """The knowledge-base entity the query mentions, or None."""
        words = f" {normalise(query)} "
        found = [name for key, name in self._by_norm.items() if f" {key} " in words]
        return max(found, key=lambda n: len(normalise(n)), default=None)

    def explain(self, query: str) -> Explanation:
        name = self.mention(query)
        if name is None:
            return Explanation(query, None, self.identity, error="no entity of the knowledge base is mentioned")
        return Explanation(query, self.entries[name], f"{self.identity}:{name}")

    def explain_many(self, queries: Sequence[str]) -> list[Explanation]:
        return _one_by_one(self, queries)


# -- OpenAI-compatible endpoint ------------------------------------------------------------------

class OpenAIExplainer:
    """Chat completions at ``base_url`` (e.g. http://localhost:8000/v1 for vLLM)."""

    def __init__(self, base_url: str, model: str, *, prompt: str = DEFAULT_PROMPT,
                 api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5, concurrency: int = 4, max_tokens: int = 96, temperature: float = 0.0,
                 clean: bool = True):
        """``clean``: cut each answer to the look it describes (``clean_explanation``)."""
        import httpx

        if not re.match(r"^https?://[^/\s]+", base_url):
            raise ExplainerError(f"explainer URL {base_url!r} must start with http:// or https:// and name a host")
        if "{query}" not in prompt:
            raise ExplainerError("the prompt template must contain {query}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout_s = timeout_s  # the whole call's deadline, every attempt and read included
        self.model, self.prompt = model, prompt
        self.retries, self.backoff_s, self.concurrency = retries, backoff_s, max(1, concurrency)
        self.max_tokens, self.temperature, self.clean = max_tokens, temperature, clean
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        # Never shown or stored: the key, and any user:password in the URL.
        user, password = urlsplit(base_url).username, urlsplit(base_url).password
        basic = base64.b64encode(f"{user}:{password}".encode()).decode() if user or password else None
        self._secrets = [x for x in (key, password, user, basic) if x]
        base_url = _without_userinfo(base_url)
        self.shown_url = _without_userinfo(self.url)
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self._httpx = httpx
        prompt_hash = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        self.identity = (f"openai:{base_url.rstrip('/')}:{model}:{prompt_hash}:{temperature}:{max_tokens}"
                         + (f":clean-v{CLEANING_VERSION}" if clean else ""))

    def explain(self, query: str) -> Explanation:
        body = {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": self.prompt.format(query=query)}]}
        deadline = time.monotonic() + self.timeout_s
        delay, error = self.backoff_s, "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                if time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
                delay *= 2
            try:
                status, raw = self._post(body, deadline)
            except self._httpx.TimeoutException:
                # Not retried: the server may be working on it still, and would run every copy.
                return self._failed(query, f"{self.shown_url} timed out: no answer within {self.timeout_s:g} s")
            except _TooLarge:
                return self._failed(query, f"{self.shown_url} sent more than {MAX_RESPONSE_BYTES:,} bytes")
            except self._httpx.HTTPError as exc:
                error = f"{self.shown_url} unreachable: {exc}"
                continue
            if status == 429 or status >= 500:
                error = f"{self.shown_url} answered {status}"
                continue  # overloaded or failing: worth another try
            if status != 200:
                return self._failed(query, f"{self.shown_url} answered {status}: {raw[:200].decode('utf-8', 'replace')}")
            try:
                text = _content_text(json.loads(raw)["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return self._failed(query, f"{self.shown_url} sent a malformed completion ({type(exc).__name__})")
            return _answer(query, self._redacted(text).strip(), self.identity, self.clean, f"{self.shown_url} sent")
        return self._failed(query, f"{error} (after {attempt + 1} attempts)")

    def _post(self, body: dict, deadline: float) -> tuple[int, bytes]:
        """One request, read under the whole call's deadline and the size cap (after decompression)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._httpx.ReadTimeout("deadline passed")
        with self._client.stream("POST", self.url, json=body, timeout=remaining) as r:
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise _TooLarge
                if time.monotonic() > deadline:  # a server dripping a byte at a time
                    raise self._httpx.ReadTimeout("deadline passed")
                chunks.append(chunk)
            return r.status_code, b"".join(chunks)

    def _redacted(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _failed(self, query: str, error: str) -> Explanation:
        return Explanation(query, None, self.identity, error=_printable(self._redacted(error)))

    def explain_many(self, queries: Sequence[str]) -> list[Explanation]:
        with ThreadPoolExecutor(self.concurrency) as pool:  # at most `concurrency` requests in flight
            return list(pool.map(self.explain, queries))

    def close(self) -> None:
        self._client.close()


# -- local causal LM -----------------------------------------------------------------------------

class TransformersExplainer:
    """A causal LM from a local folder (Hugging Face format), greedy decoding."""

    def __init__(self, model_dir: str | Path, *, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 48,
                 clean: bool = True):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise DependencyError("a local LM explainer needs torch and transformers: "
                                  "pip install 'clipmatch[export]'") from exc
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ExplainerError(f"no causal LM in {path} (config.json missing)")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.prompt, self.max_new_tokens, self.clean = prompt, max_new_tokens, clean
        # The weights' names, sizes and modification times: new weights under old names (the
        # same size or not) make a new identity, so the cache never serves their old answers.
        # Hashing the contents would read gigabytes at every start.
        weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                         if p.suffix in (".safetensors", ".json", ".bin", ".model", ".txt"))
        digest = hashlib.sha256(json.dumps(weights).encode() + prompt.encode()).hexdigest()[:12]
        self.identity = f"local:{path.resolve()}:{digest}:{max_new_tokens}" + (f":clean-v{CLEANING_VERSION}" if clean else "")
        self._lock = threading.Lock()

    def explain(self, query: str) -> Explanation:
        try:
            ids = self.tokenizer(self.prompt.format(query=query), return_tensors="pt")
            with self._lock, self._torch.no_grad():
                out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.eos_token_id)
            text = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        except Exception as exc:  # noqa: BLE001 - a failed generation must not lose the query
            return Explanation(query, None, self.identity, error=f"generation failed: {exc}")
        return _answer(query, text, self.identity, self.clean, "the model generated")

    def explain_many(self, queries: Sequence[str]) -> list[Explanation]:
        return _one_by_one(self, queries)


class _TooLarge(Exception):
    pass


# An explanation is a sentence: what a longer answer adds is not worth cleaning (cleaning is
# not linear, and a 240 KB answer took 128 s) or a tower call. Responses past 1 MiB, however
# they were compressed, are refused.
MAX_ANSWER_CHARS = 4096
MAX_RESPONSE_BYTES = 2**20


def _content_text(content) -> str:
    """The text of a message's content: a string, or OpenAI's list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return " ".join(texts)
    raise TypeError(f"content is a {type(content).__name__}, not text")


def _printable(text: str) -> str:
    """Control characters (a terminal's escape codes among them) as spaces: answers reach terminals."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", " ", text)


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _answer(query: str, text: str, identity: str, clean: bool, who: str) -> Explanation:
    text = _printable(text)[:MAX_ANSWER_CHARS]
    if not text:
        return Explanation(query, None, identity, error=f"{who} an empty explanation")
    kept = clean_explanation(text, query) if clean else text
    if not kept:
        return Explanation(query, None, identity, error=f"{who} nothing the query does not say: {text[:120]!r}",
                           final=True)
    return Explanation(query, kept, identity)


# -- cache ---------------------------------------------------------------------------------------

class CachedExplainer:
    """Any explainer, with explanations kept in SQLite: each (query, explainer identity) is made once.
    Failures are not cached, so a later call tries again; settled ones (``final``) are."""

    def __init__(self, explainer: Explainer, path: str | Path):
        self.inner = explainer
        self.identity = explainer.identity
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.note: str | None = None  # why the cache is not used, once it is not
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=2.0)
            with self._db:
                self._db.execute("CREATE TABLE IF NOT EXISTS explanations (key TEXT PRIMARY KEY, query TEXT, "
                                 "explainer TEXT, text TEXT, source TEXT, created REAL, error TEXT)")
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(explanations)")}
                if "error" not in columns:  # a cache written before settled failures were kept
                    self._db.execute("ALTER TABLE explanations ADD COLUMN error TEXT")
        except (sqlite3.Error, OSError) as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        """A corrupt, locked or read-only cache is not worth a failed search: run uncached, say so."""
        self.note = f"explanation cache {self.path} is unusable ({exc}); explaining without it"
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None

    def _key(self, query: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{query}".encode()).hexdigest()

    def explain(self, query: str) -> Explanation:
        return self.explain_many([query])[0]

    def explain_many(self, queries: Sequence[str]) -> list[Explanation]:
        queries = list(queries)
        found: dict[str, Explanation] = {}
        with self._lock:
            try:
                for q in dict.fromkeys(queries) if self._db is not None else ():
                    row = self._db.execute("SELECT text, source, error FROM explanations WHERE key = ?",
                                           (self._key(q),)).fetchone()
                    if row:
                        found[q] = Explanation(q, row[0], row[1], error=row[2], cached=True, final=row[0] is None)
            except sqlite3.Error as exc:
                self._give_up(exc)
        missing = [q for q in dict.fromkeys(queries) if q not in found]
        if missing:
            made = self.inner.explain_many(missing)
            with self._lock:
                for e in made:
                    found[e.query] = e
                try:
                    if self._db is not None:
                        with self._db:
                            for e in made:
                                if e.ok or e.final:
                                    self._db.execute(
                                        "INSERT OR REPLACE INTO explanations (key, query, explainer, text, source, "
                                        "created, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                        (self._key(e.query), e.query, self.identity, e.text, e.source, time.time(),
                                         None if e.ok else e.error))
                except sqlite3.Error as exc:
                    self._give_up(exc)
        if self.note:
            return [dataclasses.replace(found[q], note=self.note) for q in queries]
        return [found[q] for q in queries]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
