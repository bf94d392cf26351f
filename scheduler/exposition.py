"""``/metrics``: ``prometheus_client``'s exposition, with the per-job families kept between scrapes.

Everything but the per-job families is the registry as ``prometheus_client`` writes it (its
content negotiation, text or OpenMetrics, ``name[]`` filtering, gzip), exactly what its
``make_wsgi_app`` serves. The per-job families of the fleet collector are appended from
:class:`scheduler.jobseries.JobSeriesText` (before OpenMetrics' ``# EOF``): the same bytes
``prometheus_client`` would write for them, formatted again only where a value changed. For an
``escaping`` other than the default (which renames metrics), the whole page goes through
``prometheus_client``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.openmetrics.exposition import ALLOWUTF8, UNDERSCORES

from scheduler.jobseries import offer_gil

if TYPE_CHECKING:
    from scheduler.fleetmetrics import FleetCollector

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
EOF = b"# EOF\n"


class _Registry:
    """A registry's collect, restricted to ``names`` as prometheus_client does."""

    def __init__(self, registry: CollectorRegistry, names: list[str] | None) -> None:
        self.registry, self.names = registry, names

    def collect(self) -> Iterator[Metric]:
        if self.names is None:
            return iter(self.registry.collect())
        return iter(self.registry.restricted_registry(self.names).collect())


class MetricsPage:
    """The WSGI app of ``/metrics``; ``collector`` is set once the service is up."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.collector: FleetCollector | None = None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method == "OPTIONS":
            start_response("200 OK", [("Allow", "OPTIONS,GET")])
            return [b""]
        if method != "GET":
            start_response("405 Method Not Allowed", [("Allow", "OPTIONS,GET")])
            return [f"# HTTP 405 Method Not Allowed: {method}; use OPTIONS or GET\n".encode()]
        params = parse_qs(environ.get("QUERY_STRING", ""))
        pieces, content_type = self.pieces(environ.get("HTTP_ACCEPT"), params.get("name[]"))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
            pieces = [_gzip(pieces)]
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(sum(map(len, pieces)))))
        start_response("200 OK", headers)
        return pieces

    def body(self, accept: str | None, names: list[str] | None = None) -> tuple[bytes, str]:
        """The whole page :meth:`pieces` makes, and its content type."""
        pieces, content_type = self.pieces(accept, names)
        return b"".join(pieces), content_type

    def pieces(self, accept: str | None, names: list[str] | None = None) -> tuple[list[bytes], str]:
        """The exposition ``accept`` asks for (as ``prometheus_client`` chooses it), in pieces
        (one per per-job family: a 4 MB page is never copied whole while the loop waits for the
        GIL), and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        source = _Registry(self.registry, names)
        collector = self.collector
        escaping = getattr(encoder, "keywords", {}).get("escaping", UNDERSCORES)
        if collector is None or escaping not in (UNDERSCORES, ALLOWUTF8):
            return [encoder(source)], content_type
        with collector.scrape() as snap:
            head = encoder(source)
            jobs = collector.job_text(snap, encoder, set(names) if names is not None else None)
        tail = b""
        if head.endswith(EOF):
            head, tail = head[: -len(EOF)], EOF
        pieces = [head]
        for piece in jobs:
            pieces.append(piece.encode())
            offer_gil()
        pieces.append(tail)
        return pieces, content_type


def _gzip(pieces: list[bytes]) -> bytes:
    """Compress piece by piece (zlib lets go of the GIL while it works on each)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header, as gzip.compress writes
    out = [packer.compress(piece) for piece in pieces]
    out.append(packer.flush())
    return b"".join(out)
