"""A small web site to scrape, served on 127.0.0.1 from a thread: ordinary pages linked as a tree,
plus pages that misbehave the way real sites do.

- ``/slow/N``: answers after ``SLOW`` seconds.
- ``/flaky``: HTTP 500 on the first request, fine after (the fetcher's own retry copes).
- ``/broken``: HTTP 500, always.
- ``/stalls-once``: the first request never gets an answer, later ones do (a pool retry copes).
- ``/never``: never answers at all (only a timeout gets the fetcher out).

``Site.hits`` counts requests per path, so a test can check that nothing was fetched unboundedly.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SLOW = 0.3
MISBEHAVING = ["/slow/1", "/slow/2", "/flaky", "/broken", "/stalls-once", "/never"]


class Site:
    """``with Site(pages=30) as site:`` serves ``site.url`` until the block ends."""

    def __init__(self, pages: int = 30) -> None:
        self.pages = pages
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # releases the handlers that never answer
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="testsite", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/"

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def count(self, path: str) -> int:
        """Record a request for ``path``; return how many there have been, this one included."""
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def links(self, path: str) -> list[str]:
        """Home links to page 0 and to every misbehaving page; page N to pages 2N+1 and 2N+2 (a tree,
        so a crawl finds them all); every other page links back home."""
        if path == "/":
            return ["/page/0", *MISBEHAVING]
        if path.startswith("/page/"):
            number = int(path[len("/page/"):])
            return [*(f"/page/{n}" for n in (2 * number + 1, 2 * number + 2) if n < self.pages), "/"]
        return ["/"]

    def pause(self, seconds: float | None = None) -> None:
        """Hold a request for ``seconds`` (None: without answering, until the site stops)."""
        self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)
        # else: a fetcher stopped by its timeout hung up on us, as it should: nothing to report


def _handler_for(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            hits = site.count(path)
            if path == "/never" or (path == "/stalls-once" and hits == 1):
                site.pause()
                return
            if path == "/broken" or (path == "/flaky" and hits == 1):
                self.send_error(500, "Internal Server Error")
                return
            if path.startswith("/slow/"):
                site.pause(SLOW)
            known = path in ("/", "/flaky", "/stalls-once") or path.startswith("/slow/") or (
                path.startswith("/page/") and path[6:].isdigit() and int(path[6:]) < site.pages)
            if not known:
                self.send_error(404, "Not Found")
                return
            title = "Home" if path == "/" else path.strip("/").replace("/", " ").title()
            anchors = "".join(f'<li><a href="{link}">{link}</a></li>' for link in site.links(path))
            body = (f"<!doctype html><html><head><title>{title}</title></head>"
                    f"<body><h1>{title}</h1><ul>{anchors}</ul></body></html>").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the example's output readable

    return Handler
