"""Crawl a site with a pool of worker processes: every page fetched and parsed in a worker, a
per-page timeout that really stops a stuck fetch, and retries for pages that stalled.

    python scrape.py                      # crawls its own local test site (testsite.py)
    python scrape.py --output pages.jsonl --workers 8 --timeout 2 --retries 2

New links are submitted as soon as a page yields them, so one stuck page never holds up the rest.
Each page's outcome is one JSON line (stdout unless --output): the page's title and links, or why
it failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, wait
from html.parser import HTMLParser
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from testsite import Site

import forkio

HTTP_ATTEMPTS = 2  # server errors (5xx) are retried here, inside the task; hangs by the pool

_opener: urllib.request.OpenerDirector | None = None


def start_worker() -> None:
    """The pool's initializer: runs once in each worker before its first task, so importing this
    module and setting up are not counted against a page's timeout."""
    global _opener
    # No proxies: the test site is on loopback, and an http_proxy setting must not send us elsewhere.
    _opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HTTPStatusError(Exception):
    """The server answered with an error status. (``urllib.error.HTTPError`` itself cannot be
    unpickled, so it cannot travel back from a worker as itself.)"""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(url, status)
        self.url, self.status = url, status

    def __str__(self) -> str:
        return f"HTTP {self.status} from {self.url}"


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.links: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def fetch_page(url: str) -> dict[str, Any]:
    """Runs in a worker: fetch ``url``, parse it, return its title and absolute links."""
    if _opener is None:
        start_worker()  # called directly, not in a pool
    assert _opener is not None
    started = time.monotonic()
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            # The socket timeout is only a backstop: the pool's per-task timeout is what bounds
            # the whole fetch (connect, slow reads, a parser gone wrong), whatever is stuck.
            with _opener.open(url, timeout=60) as response:
                charset = response.headers.get_content_charset() or "utf-8"
                html = response.read().decode(charset, "replace")
            break
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code < 500 or attempt == HTTP_ATTEMPTS:
                raise HTTPStatusError(url, exc.code) from None
            time.sleep(0.1 * attempt)  # a short back-off before asking again
    parser = _PageParser()
    parser.feed(html)
    return {"title": parser.title.strip(), "links": [urljoin(url, link) for link in parser.links],
            "http_attempts": attempt, "seconds": round(time.monotonic() - started, 3)}


def _failure(error: BaseException) -> dict[str, str]:
    kind = ("timeout" if isinstance(error, forkio.TaskTimeout) else
            "crashed" if isinstance(error, forkio.WorkerCrashed) else "exception")
    return {"kind": kind, "type": type(error).__name__, "message": str(error)}


def crawl(start: str, out: IO[str], *, workers: int = 8, timeout: float = 2.0, retries: int = 2,
          max_pages: int = 100) -> dict[str, int]:
    """Fetch ``start`` and every page it leads to on the same host (at most ``max_pages``),
    writing one JSON line per page; return how many pages succeeded and failed."""
    host = urlsplit(start).netloc
    seen = {start}
    counts = {"ok": 0, "failed": 0}
    # Fetching is I/O-bound: more workers than cores is fine.
    with forkio.Pool(workers, initializer=start_worker) as pool:
        fetch = pool.options(timeout=timeout, retries=retries)  # retries: after a timeout or a crash
        pending: dict[Future[Any], str] = {fetch.submit(fetch_page, start): start}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                url = pending.pop(future)
                record: dict[str, Any] = {"url": url}
                try:
                    page = future.result()
                except Exception as exc:
                    record.update(ok=False, error=_failure(exc))
                    counts["failed"] += 1
                else:
                    record.update(ok=True, **page)
                    counts["ok"] += 1
                    for link in page["links"]:
                        link = link.split("#", 1)[0]
                        if urlsplit(link).netloc == host and link not in seen and len(seen) < max_pages:
                            seen.add(link)
                            pending[fetch.submit(fetch_page, link)] = link
                out.write(json.dumps(record) + "\n")
                out.flush()
    return counts


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--pages", type=int, default=30, help="ordinary pages on the test site (default 30)")
    cli.add_argument("--workers", "-j", type=int, default=8, help="worker processes (default 8)")
    cli.add_argument("--timeout", type=float, default=2.0, help="seconds per page fetch (default 2)")
    cli.add_argument("--retries", type=int, default=2, help="fetches again after a timeout (default 2)")
    cli.add_argument("--output", "-o", help="write the JSON lines here (default: stdout)")
    args = cli.parse_args()
    started = time.monotonic()
    with Site(pages=args.pages) as site:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            counts = crawl(site.url, out, workers=args.workers, timeout=args.timeout, retries=args.retries)
        finally:
            if out is not sys.stdout:
                out.close()
        requests = sum(site.hits.values())
    print(f"crawled {counts['ok'] + counts['failed']} pages in {time.monotonic() - started:.1f} s: "
          f"{counts['ok']} ok, {counts['failed']} failed; {requests} requests to {site.url}", file=sys.stderr)


if __name__ == "__main__":
    main()
