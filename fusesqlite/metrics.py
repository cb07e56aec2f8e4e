"""A mount's Prometheus metrics (``mount --metrics ADDR``): what each one counts, and
the endpoint that serves them.

The hot path only adds to plain integers kept by the objects that do the work
(``Operations.requests``, ``Transactions.commits``, ``BlockCache.hits``, ...): a
few tens of nanoseconds, counted with or without ``--metrics``, so the unmount's
log line can report them too. A scrape reads them on the event loop's own thread
(``trio.from_thread``), where they change, so it sees one consistent moment. The
two latency histograms are prometheus_client's, observed once per commit and per
store transaction (well under a microsecond against a commit's hundreds).

Names start with ``fusesqlite_``; the list, with what each means, is in
docs/operating.md. The process's own (``process_*``: CPU, resident memory, open
files) come from prometheus_client's ProcessCollector.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import resource
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fusesqlite import _journal

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from fusesqlite.fs.operations import Operations

log = logging.getLogger("fusesqlite.metrics")

#: the port ``--metrics PORT`` and the README's examples use (Prometheus's
#: registry of default ports has none for fusesqlite; 9464 is the OpenTelemetry
#: exporter's, free on a host that runs no such exporter)
DEFAULT_PORT = 9464

#: seconds: from a fast local commit (~100 µs) to a store that waits (~10 s)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: how a commit ended (``Transactions.commits``)
OUTCOMES = ("ok", "conflict", "busy", "error")

class MetricsError(ValueError):
    """A ``--metrics`` address that cannot be served (one line, says what to do)."""


def parse_address(text: str) -> tuple[str, int]:
    """``PORT`` (on 127.0.0.1), ``HOST:PORT`` or ``[IPV6]:PORT``: (host, port).

    Only loopback without an explicit host: metrics say which files an app writes
    and how much, which not every host on the network should learn."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise MetricsError(f"--metrics {text!r}: name the address to listen on, e.g. 127.0.0.1:{DEFAULT_PORT}")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise MetricsError(f"--metrics {text!r}: the port must be a number from 1 to 65535, e.g. {DEFAULT_PORT}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise MetricsError(f"--metrics {text!r}: {host!r} is not an IP address; give one, "
                               f"e.g. 127.0.0.1:{DEFAULT_PORT} or 0.0.0.0:{DEFAULT_PORT}") from None
    return host, port


def latency_histogram(name: str, documentation: str) -> Histogram:
    """A latency histogram of its own registry (the endpoint's collector hands it on)."""
    return Histogram(name, documentation, unit="seconds", buckets=LATENCY_BUCKETS, registry=None)


class Endpoint:
    """The HTTP server of ``/metrics``, bound before the mount so that a port in use
    is an error before anything else happens."""

    def __init__(self, address: str) -> None:
        host, port = parse_address(address)
        disable_created_metrics()  # no *_created series: this daemon is the only user of the library
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        try:
            self._server: WSGIServer = start_http_server(port, host, registry=self.registry)[0]
        except OSError as e:
            raise MetricsError(f"--metrics {address}: cannot listen on {host}:{port} ({e.strerror or e}); "
                               "choose a free port or another address") from None
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self._server.server_port}/metrics"
        log.info("event=metrics_listening url=%s", self.url)

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MountCollector(Collector):
    """Every ``fusesqlite_`` metric of one mount, read on its event loop at each scrape."""

    def __init__(self, ops: Operations, memory_budget_bytes: int, token: trio.lowlevel.TrioToken,
                 extra: Callable[[], Iterator[Metric]] | None = None) -> None:
        self.ops = ops
        self.memory_budget_bytes = memory_budget_bytes
        self.token = token
        self.extra = extra  # the store's own (store/metered.py)

    def collect(self) -> Iterator[Metric]:
        try:
            # every handler yields to the loop within a request, so this waits that long at most
            figures = trio.from_thread.run_sync(self._figures, trio_token=self.token)
        except trio.RunFinishedError:  # unmounting
            return
        yield from figures
        if self.extra is not None:
            yield from self.extra()

    def _figures(self) -> list[Metric]:
        """On the event loop: everything at one moment."""
        ops, tx = self.ops, self.ops.tx
        out: list[Metric] = []

        def counter(name: str, doc: str, value: float) -> None:
            out.append(CounterMetricFamily(f"fusesqlite_{name}", doc, value=value))

        def gauge(name: str, doc: str, value: float, unit: str = "") -> None:
            out.append(GaugeMetricFamily(f"fusesqlite_{name}", doc, value=value, unit=unit))

        commits = CounterMetricFamily("fusesqlite_commits", "Commits of stored files, by how they ended",
                                      labels=["outcome"])
        for outcome in OUTCOMES:
            commits.add_metric([outcome], tx.commits[outcome])
        out.append(commits)
        out.extend(tx.commit_seconds.collect())
        requests = CounterMetricFamily("fusesqlite_fuse_requests",
                                       "FUSE requests answered in Python, by operation", labels=["operation"])
        for op, n in sorted(ops.requests.items()):
            requests.add_metric([op], n)
        out.append(requests)
        in_c = CounterMetricFamily("fusesqlite_fuse_requests_in_c",
                                   "Journal requests answered in C without Python (the native path)",
                                   labels=["operation"])
        writes, reads, syncs, _ = _journal.stats()
        for op, n in (("write", writes), ("read", reads), ("fsync_or_flush", syncs)):
            in_c.add_metric([op], n)
        out.append(in_c)
        counter("block_cache_hits", "Block reads answered from the block cache", tx.cache.hits)
        counter("block_cache_misses", "Block reads that went to the store", tx.cache.misses)
        gauge("block_cache_bytes", "Decoded blocks held by the block cache", tx.cache.used, "bytes")
        counter("read_ahead_bytes", "Bytes read from the store ahead of sequential reads", tx.readahead.loaded_bytes)
        counter("written_bytes", "Bytes written to stored files (journals and WALs' transient files excepted)",
                tx.written_bytes)
        counter("committed_bytes", "Bytes of blocks committed to the store", tx.committed_bytes)
        counter("staged_bytes", "Bytes of blocks staged into the store before their commit (big transactions)",
                tx.staged_bytes)
        gauge("uncommitted_bytes", "Bytes of written blocks held in memory until their commit",
              sum(len(fs.dirty) for fs in tx.files.values()) * tx.bs, "bytes")
        gauge("lag", "How long other mounts' newest commits have waited to be followed here (0: caught up)",
              ops.coherence.lag(), "seconds")
        gauge("leases_held", "Write leases this mount holds", len(ops.coherence.held()))
        watched = ops.coherence.watched
        gauge("followed_inodes", "Files and directories followed one by one (0: the whole volume, its log at "
              "every commit)", len(watched) if watched is not None else 0)
        counter("follow_log_reads", "Reads of the volume's log to follow other mounts' commits",
                ops.coherence.log_reads)
        gauge("memory_budget", "The memory budget (--memory-mb)", self.memory_budget_bytes, "bytes")
        gauge("memory_resident", "Resident memory of the daemon", _resident_bytes(), "bytes")
        gauge("memory_peak", "Peak resident memory of the daemon",
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "bytes")
        return out


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
