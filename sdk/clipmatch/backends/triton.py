"""Running the served components on a Triton server, behind the same ``Executor`` protocol as onnxruntime.

``clipmatch.connect(url, export_dir)`` gives a ``Remote``: the very ``Matcher``
that ``Local`` is (tokenizer, preprocessing, broadcasting, result types), with
each graph call sent to Triton instead. Large calls are split to the served
model's max batch size and sent several at a time; results come back in order.

The served models' identity is checked whenever an answer may come from
another server than the one last checked: each thread's client is checked on
its first call, after a call that was retried for anything but overload, and
after a call that went over a new connection (an HTTP socket the client opened
for it; a gRPC channel that was not ready when the call began). A server
restarted between two calls is only reached on a new connection. The answer
of such a call is returned only once the server passed the check, over the
same client, so rows from another model never reach the caller.

Needs ``tritonclient`` (install extra ``clipmatch[triton]``).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from clipmatch.config import DEFAULT_CONFIG, RuntimeConfig
from clipmatch.contract import COMPONENTS, DCSM, ENTITY_PARTS, RESCORE_INPUTS, RESCORE_NAME, RESCORE_OUTPUTS, identity_parameters
from clipmatch.errors import BackendError, ConfigError, DependencyError, IncompatibleModelError
from clipmatch.executor import validate_feeds
from clipmatch.manifest import ExportManifest
from clipmatch.matcher import Matcher, ModelFiles
from clipmatch.results import RescoreResult

__all__ = ["TritonOptions", "TritonExecutor", "Remote", "connect"]

_TRITON_DTYPE = {"float32": "FP32", "int64": "INT64"}
# Server answers worth another try: not there yet, restarting, or overloaded. Inference is a
# pure function of its inputs, so a request the server may or may not have run is safe to resend.
_RETRYABLE = ("unavailable", "connection refused", "connection reset", "failed to connect", "502", "503",
              "504", "service unavailable", "too many requests", "429", "exceeds the maximum queue",
              "server is not ready", "timed out", "deadline exceeded", "broken pipe", "remote end closed",
              "socket closed", "connection closed", "is not ready", "no healthy upstream",
              # a server shutting down unloads its models before it closes its ports
              "has no available versions")
# Of those, the answers of a server that is there and busy: retrying them reaches the same server.
_OVERLOADED = ("too many requests", "429", "exceeds the maximum queue")


@dataclass(frozen=True)
class TritonOptions:
    """How to talk to the server. ``headers`` go with every request (e.g. a gateway's API key);
    TLS is on for https:// and grpcs:// URLs."""

    timeout_s: float = 30.0
    # Extra attempts on unavailable / overloaded answers, the first after backoff_s, doubling up
    # to max_backoff_s: 0.2 + 0.4 + ... + 5 + 5 + 5 = 21 s by default, so a long job (an index
    # through the server) rides out a server restart; restarts took 4-11 s here.
    retries: int = 8
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    concurrency: int = 4  # chunks of one call in flight at once
    headers: Mapping[str, str] = field(default_factory=dict)
    ssl_ca_file: str | None = None  # CA bundle for the server's certificate
    ssl_cert_file: str | None = None  # client certificate (mutual TLS)
    ssl_key_file: str | None = None
    insecure: bool = False  # skip certificate checks (test servers only)


def _import(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as exc:
        raise DependencyError("talking to Triton needs tritonclient: pip install 'clipmatch[triton]'") from exc
    return client


class TritonExecutor:
    """``run(component, feeds)`` against a Triton server; one client per thread of the pool."""

    def __init__(self, url: str, manifest: ExportManifest, options: TritonOptions = TritonOptions(), *,
                 source: str = "the local export"):
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https", "grpc", "grpcs"):
            raise ConfigError(f"Triton URL {url!r} must start with http://, https://, grpc:// or grpcs://")
        self.url = url
        self.protocol = "grpc" if parsed.scheme.startswith("grpc") else "http"
        self.tls = parsed.scheme in ("https", "grpcs")
        self.address = parsed.netloc
        self.manifest = manifest
        self.source = source  # where the manifest came from, for error messages
        self.options = options
        self._client_module = _import(self.protocol)
        self.max_batch: dict[str, int] = {}
        self.identity_models: tuple[str, ...] = tuple(c for c in COMPONENTS if c in manifest.components)
        # One client per thread (HTTP clients are gevent-based and must stay on the thread
        # that made them), each with what is known of the server it reaches.
        self._links: dict[int, _Link] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, options.concurrency), thread_name_prefix="clipmatch")
        try:
            self._client = self._link().client
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    # -- connection -------------------------------------------------------------

    def _new_client(self):
        o = self.options
        if self.protocol == "grpc":
            creds = {}
            if self.tls:
                creds = {"ssl": True, "root_certificates": o.ssl_ca_file, "private_key": o.ssl_key_file,
                         "certificate_chain": o.ssl_cert_file}
            return self._client_module.InferenceServerClient(self.address, **creds)
        kwargs = {"connection_timeout": o.timeout_s, "network_timeout": o.timeout_s}
        if self.tls:
            import gevent.ssl as gssl

            ctx = gssl.create_default_context(cafile=o.ssl_ca_file)
            if o.ssl_cert_file:
                ctx.load_cert_chain(o.ssl_cert_file, o.ssl_key_file)
            if o.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = gssl.CERT_NONE
            kwargs.update(ssl=True, ssl_context_factory=lambda: ctx, insecure=o.insecure)
        return self._client_module.InferenceServerClient(self.address, **kwargs)

    def _link(self) -> _Link:
        """This thread's client and its watch."""
        key = threading.get_ident()
        with self._lock:
            link = self._links.get(key)
        if link is None:
            link = _Link(self._new_client(), self.protocol)  # watched before it is ever used
            with self._lock:
                self._links[key] = link
        return link

    def _thread_client(self):
        return self._link().client

    def verify(self) -> None:
        """Check the identity of the server this thread's client reaches, now."""
        link = self._link()
        self.check_identity(link.client)
        # Connections the check itself opened reached the server that just passed it.
        link.verified_at = link.changes

    def _call(self, what: str, fn):
        """fn(client) with retries, answered only by a server verified to serve this export."""
        link = self._link()
        unchecked = link.unchecked()  # before the call: is it about to open a connection?
        result, reconnected = self._attempts(what, lambda: fn(link.client))
        if unchecked or reconnected or link.unchecked():
            self.verify()  # raises IncompatibleModelError: the answer is dropped
        return result

    def _attempts(self, what: str, fn):
        """(fn(), whether a failure may have moved it to another server), retrying answers that mean
        "try again"; other errors at once."""
        delay, moved = self.options.backoff_s, False
        for attempt in range(self.options.retries + 1):
            try:
                return fn(), moved
            except Exception as exc:  # noqa: BLE001 - tritonclient raises several unrelated types
                message = str(exc)
                retryable = any(s in message.lower() for s in _RETRYABLE) or isinstance(exc, (ConnectionError,
                                                                                               OSError))
                if not retryable:
                    raise BackendError(f"{self.url}: {what} failed: {message}") from exc
                if attempt == self.options.retries:
                    raise BackendError(f"{self.url}: {what} failed after {attempt + 1} attempts; the server is "
                                       f"unavailable or overloaded: {message}") from exc
                # An overloaded server answered, so it is still the one it was; anything else may not be.
                moved |= not any(s in message.lower() for s in _OVERLOADED)
                time.sleep(delay)
                delay = min(delay * 2, self.options.max_backoff_s)

    def model_config(self, name: str, client=None) -> dict:
        client = client or self._thread_client()

        def get():
            cfg = client.get_model_config(name, headers=dict(self.options.headers) or None,
                                          **({"as_json": True} if self.protocol == "grpc" else {}))
            return cfg.get("config", cfg)
        return self._attempts(f"reading the config of model {name!r}", get)[0]

    def check_identity(self, client=None) -> None:
        """Refuse a server whose models are not this export's, saying what differs."""
        expected = identity_parameters(self.manifest)
        for name in self.identity_models:  # contract order, then rescore when it is used
            cfg = self.model_config(name, client)
            params = {k: (v.get("string_value") if isinstance(v, dict) else v)
                      for k, v in (cfg.get("parameters") or {}).items()}
            diffs = [f"{k}: server {params.get(k)!r}, local {v!r}" for k, v in expected.items() if params.get(k) != v]
            if diffs:
                raise IncompatibleModelError(f"{self.url} serves a different {name} than the export in "
                                             f"{self.source}: " + "; ".join(diffs))
            self.max_batch[name] = int(cfg.get("max_batch_size") or 0) or 1 << 30

    def health_check(self) -> None:
        """A real inference: one text through the text tower (not only a liveness ping)."""
        ids = np.array([[0, 1]], dtype=np.int64)
        self.run("text_tower", {"input_ids": ids, "attention_mask": np.ones_like(ids)})

    # -- inference --------------------------------------------------------------

    def run(self, component: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        validate_feeds(component, feeds, self.manifest.sizes)
        n = next(iter(feeds.values())).shape[0]
        step = self.max_batch.get(component, n) or n
        chunks = [{k: np.ascontiguousarray(v[s:s + step]) for k, v in feeds.items()} for s in range(0, n, step)]
        if len(chunks) == 1:  # no pool hop; each thread uses its own client (HTTP clients are per thread)
            parts = [self._infer(component, chunks[0])]
        else:
            parts = list(self._pool.map(lambda c: self._infer(component, c), chunks))
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _infer(self, component: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = COMPONENTS[component]
        send = lambda client: self._request(client, component, spec.inputs, spec.outputs, feeds)  # noqa: E731
        rows = next(iter(feeds.values())).shape[0]
        out = self._call(f"inference on {component} ({rows} rows)", send)
        for t in spec.outputs:
            if len(t.dims) == 1:
                out[t.name] = out[t.name].reshape(rows)  # served as (rows, 1)
            if out[t.name].shape[0] != rows:
                raise BackendError(f"{self.url}: {component} returned {out[t.name].shape[0]} rows of "
                                   f"{t.name} for {rows} inputs")
        return out

    def _request(self, client, model: str, inputs, outputs, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference request: ``inputs`` / ``outputs`` are the TensorSpecs of ``model``."""
        mod = self._client_module
        tensors = []
        for t in inputs:
            x = np.ascontiguousarray(feeds[t.name])
            i = mod.InferInput(t.name, list(x.shape), _TRITON_DTYPE[t.dtype])
            i.set_data_from_numpy(x)
            tensors.append(i)
        kwargs = {"headers": dict(self.options.headers) or None}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.options.timeout_s
        result = client.infer(model, tensors, outputs=[mod.InferRequestedOutput(t.name) for t in outputs], **kwargs)
        return {t.name: result.as_numpy(t.name) for t in outputs}

    def rescore(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request to the served ``rescore`` model (see serving/triton_models/rescore_model.py)."""
        k = feeds["image_tokens"].shape[0]

        def send(client):
            out = self._request(client, RESCORE_NAME, RESCORE_INPUTS, RESCORE_OUTPUTS, feeds)
            return {name: v.reshape(k) for name, v in out.items()}

        return self._call(f"rescoring {k} candidates", send)

    def serves(self, model: str) -> bool:
        try:
            self.model_config(model)
        except BackendError:
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            try:
                link.client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


class _Link:
    """One thread's client, and whether its next answer may come over an unchecked connection."""

    _GRPC_READY = 2  # grpc.ChannelConnectivity.READY

    def __init__(self, client, protocol: str):
        self.client, self.protocol = client, protocol
        self.changes = 0  # HTTP: sockets the client opened; gRPC: channel state changes seen
        self.verified_at = -1  # ``changes`` when the identity was last confirmed
        try:
            if protocol == "http":
                pool = client._client_stub._connection_pool
                create = pool._create_socket

                def counted():  # runs inside the request that needs the socket: seen before it returns
                    sock = create()
                    self.changes += 1
                    return sock
                pool._create_socket = counted
            else:
                self._state = client._channel._channel.check_connectivity_state
                # Reported from gRPC's own thread, soon after: a restart takes seconds, so a
                # channel that reconnected between two calls has said so before the second.
                client._channel.subscribe(self._changed, try_to_connect=False)
        except AttributeError as exc:  # the clients' internals moved: fail loudly, not unsafely
            raise DependencyError(f"this tritonclient/grpcio version cannot be watched for new connections ({exc}); "
                                  "install the versions clipmatch[triton] names") from exc

    def _changed(self, _state) -> None:
        self.changes += 1

    def unchecked(self) -> bool:
        """True when the next answer may come from a server this client has not checked."""
        if self.verified_at != self.changes:
            return True
        # A gRPC channel that is not ready opens a connection in the call itself, which its
        # state report may not beat. A ready one can only move if the server dies during the
        # call, which then fails and is retried, and a retry forces the check.
        return self.protocol == "grpc" and self._state(False) != self._GRPC_READY


class Remote(Matcher):
    """The ``Matcher`` of an export whose graphs are served by Triton."""

    def __init__(self, url: str, export_dir: str | Path, config: RuntimeConfig = DEFAULT_CONFIG,
                 options: TritonOptions = TritonOptions(), *, health_check: bool = True):
        files = ModelFiles.load(export_dir)
        executor = TritonExecutor(url, files.manifest, options, source=str(export_dir))
        try:
            heads = {c.name for c in (*ENTITY_PARTS, DCSM)} <= set(files.manifest.components)
            self.served_rescore = heads and executor.serves(RESCORE_NAME)
            if self.served_rescore:  # then its identity is checked with the components'
                executor.identity_models += (RESCORE_NAME,)
            executor.verify()
            if health_check:
                executor.health_check()
        except BaseException:
            executor.close()
            raise
        super().__init__(files, executor, config)

    def rescore(self, query, candidates, *, explanation=None, heads=None) -> RescoreResult:
        """As ``Matcher.rescore``; with every head wanted and a text query, in one request to
        the served ``rescore`` model instead of one per component."""
        if not self.served_rescore or heads is not None or not isinstance(query, str) \
                or not (explanation is None or isinstance(explanation, str)):
            return super().rescore(query, candidates, explanation=explanation, heads=heads)
        cands = self.with_vision_experts(self.encode_images(candidates))
        t = time.perf_counter()
        q = self._tokens(query)
        e = q if explanation is None else self._tokens(explanation)
        out = self.executor.rescore({
            "input_ids": q.input_ids, "attention_mask": q.attention_mask, "functional_ids": q.functional_ids,
            "explanation_ids": e.input_ids, "explanation_mask": e.attention_mask,
            "image_tokens": np.ascontiguousarray(cands.tokens, np.float32),
            "vision_experts": np.ascontiguousarray(cands.vision_experts, np.float32),
        })
        return RescoreResult(cosine=out["cosine"], match_prob=out["match_prob"], entity_score=out["entity_score"],
                             dcsm=out["dcsm_logit"], explained=explanation is not None,
                             truncated=bool(q.truncated[0]),
                             explanation_truncated=explanation is not None and bool(e.truncated[0]),
                             dcsm_truncated=int(q.lengths[0]) > self.manifest.sizes["dcsm_text_length"],
                             timings_ms={"heads": (time.perf_counter() - t) * 1e3})

    def _tokens(self, text: str):
        """One text's token batch, cut to its own length (as ``encode_texts`` sends it)."""
        batch = self.tokenize([text])
        return batch.fit(int(batch.lengths[0]))

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(url: str, export_dir: str | Path, *, config: RuntimeConfig = DEFAULT_CONFIG, **options) -> Remote:
    """A ``Remote`` for the Triton server at ``url`` (http://, https://, grpc:// or grpcs://) that
    serves the export in ``export_dir`` (its manifest and tokenizer stay on the client).

    >>> m = clipmatch.connect("grpc://localhost:8001", "exports/default")  # doctest: +SKIP
    >>> m.rescore("a red circle left of a blue square", ["a.png", "b.png"]).dcsm  # doctest: +SKIP
    """
    return Remote(url, export_dir, config, TritonOptions(**options))
