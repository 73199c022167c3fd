"""A chat-completions endpoint of the tests' own, on 127.0.0.1 at an ephemeral port."""
from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer


class LoopbackEndpoint:
    """Serves ``handler`` (a BaseHTTPRequestHandler) until ``close``; ``base_url`` ends in /v1."""

    def _serve(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True  # a handler still dripping bytes must not hold up close()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
    """One JSON response with its length, from inside a handler's do_POST."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
