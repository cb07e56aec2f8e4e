"""Read-ahead: while a file is read forwards, load the blocks after it in the background.

The kernel keeps only one to three reads of a file in flight, and each would wait
for a store read and the decoding of its blocks: a cold scan would run at the speed
of that round trip. Here a read that continues the previous one starts loads of
the next blocks (a window that doubles with every sequential read, up to a
bound) in a worker thread, so the kernel's next read finds them loaded or on
the way while the store read after it is already running. A read a few blocks
past the last one continues it too (``GAP_BLOCKS``): SQLite reading a b-tree whose
rows overflow reads its pages in order with the overflow pages between them
unread, and without read-ahead each of its reads is a store round trip.

A load (``Run``) decodes its blocks into one buffer, and reads are served from
it with a slice: per block, the event loop does no work at all. Runs stay out
of the block cache (a scan does not evict the blocks point reads keep hot), are
dropped once read past, and are bounded in bytes over all files.

A run is tagged with the file's ``gen`` and a block-cache mark when it starts.
A read uses it only if ``gen`` did not move since (refresh, rollback, commit),
no commit or staging changed the file's blocks since (``BlockCache.unchanged_since``)
and the file has no uncommitted blocks: read-ahead never serves content older
than what a read started at the same moment would have loaded.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from fusesqlite.pages import BlockCache, decode_rows
from fusesqlite.volume import Volume

if TYPE_CHECKING:
    from fusesqlite.file_state import FileState

log = logging.getLogger("fusesqlite.readahead")


class Run:
    """Consecutive blocks of one file loaded ahead into one buffer (or on their way)."""

    __slots__ = ("start", "end", "size", "gen", "mark", "done", "data", "dropped")

    def __init__(self, start: int, end: int, block_size: int, gen: int, mark: int) -> None:
        self.start, self.end = start, end
        self.size = (end - start) * block_size  # bytes it holds once loaded
        self.gen = gen
        self.mark = mark  # BlockCache.mark() when the load began
        self.done = trio.Event()
        self.data: bytearray | None = None  # None once done: the load failed (a read reports it)
        self.dropped = False  # no read is likely to want it: the loader skips it if it has not begun


class _Stream:
    """Where a file's sequential reading stands, and its runs in block order."""

    __slots__ = ("next_block", "window", "ahead", "gen", "runs", "misses")

    def __init__(self, next_block: int, gen: int) -> None:
        self.next_block = next_block  # a read starting here (or close to it) continues the stream
        self.window = 0  # blocks to keep loaded ahead of the last read; 0: not sequential (yet)
        self.ahead = next_block  # runs cover (or covered) the blocks up to here
        self.gen = gen
        self.runs: list[Run] = []
        self.misses = 0  # reads elsewhere since the last one that continued the stream


class ReadAhead:
    """Sequential-read detection per file, the loads it starts, and reads served from them."""

    #: files whose reading position is remembered
    STREAMS = 256
    #: reads elsewhere in a file that leave its sequential stream (and runs) as they are
    MISSES = 3
    #: blocks a read may skip past the last one and still continue its stream
    GAP_BLOCKS = 16

    def __init__(self, volume: Volume, cache: BlockCache, max_bytes: int = 4 << 20,
                 chunk_bytes: int = 1 << 20) -> None:
        self.volume = volume
        self.cache = cache
        #: the window's bound: a quarter of the block cache's budget, at most max_bytes
        self.max_bytes = min(max_bytes, cache.capacity // 4)
        self.chunk_bytes = chunk_bytes
        self._loader = _Loader()
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self._bytes = 0  # held by runs, loaded or loading, over all files: at most 2 * max_bytes
        self.loaded_bytes = 0  # read ahead since the mount began (metrics.py)

    # -- reads ---------------------------------------------------------------------------
    async def read(self, fs: FileState, offset: int, end: int, block_size: int) -> bytes | memoryview | None:
        """``fs``'s bytes ``offset .. end`` if runs cover them all (waiting for runs on their
        way), else None: the caller reads them itself."""
        stream = self._streams.get(fs.ino)
        if stream is None or not stream.runs or fs.dirty or fs.committing:
            return None
        first, last = offset // block_size, (end - 1) // block_size
        covering = []
        b = first
        for run in stream.runs:
            if run.end <= b:
                continue
            if run.start > b:
                break
            covering.append(run)
            b = run.end
            if b > last:
                break
        if b <= last:
            return None
        for run in covering:
            await run.done.wait()
        if any(not self._usable(fs, run) for run in covering):
            return None
        pieces = []
        for run in covering:
            base = run.start * block_size
            lo, hi = max(offset, base) - base, min(end, run.end * block_size) - base
            assert run.data is not None  # _usable
            pieces.append(memoryview(run.data)[lo:hi])
        # one run: a view of it, which pyfuse3 replies from without a copy (a run's
        # buffer never changes once loaded)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if end >= covering[-1].end * block_size:  # read past: no later read wants it
            self._drop(stream, covering[-1].end)
        return data

    def _usable(self, fs: FileState, run: Run) -> bool:
        return (
            run.data is not None and run.gen == fs.gen and self.cache.unchanged_since(fs.ino, run.mark)
            and not fs.dirty and not fs.committing
        )

    # -- starting loads ------------------------------------------------------------------
    def note_read(self, fs: FileState, first: int, last: int, block_size: int) -> None:
        """A read of blocks ``first..last`` of ``fs`` begins: if it continues the stream, load ahead."""
        max_blocks = self.max_bytes // block_size
        if max_blocks == 0:
            return
        stream = self._streams.get(fs.ino)
        if stream is None:
            self._streams[fs.ino] = _Stream(last + 1, fs.gen)
            while len(self._streams) > self.STREAMS:
                self._forget(self._streams.popitem(last=False)[1])
            return
        self._streams.move_to_end(fs.ino)
        count = last - first + 1
        # a read a little ahead of the last one goes on with it: a b-tree's pages read in
        # order between pages nobody reads (the rows' overflow pages, for a count(*) of
        # big rows) are a scan too, and loading the pages between costs bandwidth only
        sequential = stream.next_block - count <= first <= stream.next_block + max(count, self.GAP_BLOCKS)
        if not sequential and stream.misses < self.MISSES:
            stream.misses += 1  # e.g. SQLite reading a B-tree interior page mid-scan
            return
        if not sequential or stream.gen != fs.gen:
            self._forget(stream)
            stream.next_block, stream.window, stream.ahead, stream.gen, stream.misses = last + 1, 0, last + 1, fs.gen, 0
            return
        stream.next_block = max(stream.next_block, last + 1)
        stream.misses = 0
        stream.window = min(max_blocks, max(2 * stream.window, count))
        self._drop(stream, first)  # read past (or never usable)
        self._start(fs, stream, last + 1, block_size)

    def _start(self, fs: FileState, stream: _Stream, after: int, block_size: int) -> None:
        limit = min(-(-fs.size // block_size), max(fs.record.hwm, fs.staged_hwm))  # beyond hwm: zeros
        target = min(after + stream.window, limit)
        start = max(stream.ahead, after)
        if start - after > stream.window // 2:
            return  # topped up once half the window is read: whole chunks, not one load per read
        chunk = max(1, self.chunk_bytes // block_size)
        while start < target:
            end = min(start + chunk, target)
            run = Run(start, end, block_size, fs.gen, self.cache.mark())
            if self._bytes + run.size > 2 * self.max_bytes and not self._evict(stream, run.size):
                break
            stream.runs.append(run)
            self._bytes += run.size
            self.loaded_bytes += run.size
            self._loader.submit(run, fs.label, self._load, fs.ino, fs.read_version, block_size)
            start = end
        stream.ahead = max(stream.ahead, start)

    def _load(self, ino: int, start: int, end: int, version: int, block_size: int) -> bytearray:
        """Blocks ``start .. end - 1`` of ``ino`` as of ``version``, decoded (in the loader's thread)."""
        return decode_rows(self.volume.read_run(ino, start, end, version), ino, start, end - start, version, block_size)

    # -- memory ----------------------------------------------------------------------------
    def _drop(self, stream: _Stream, below: int) -> None:
        """Forget the stream's runs that end at or before block ``below`` (reads may still wait for them)."""
        while stream.runs and stream.runs[0].end <= below:
            self._bytes -= stream.runs.pop(0).size

    def _forget(self, stream: _Stream) -> None:
        """Forget all the stream's runs: its reads went elsewhere, so the loader skips those not begun."""
        for run in stream.runs:
            run.dropped = True
        self._drop(stream, stream.runs[-1].end if stream.runs else 0)

    def _evict(self, keep: _Stream, size: int) -> bool:
        """Drop other files' runs, least recently read first, until ``size`` more bytes fit."""
        for other in list(self._streams.values()):
            if self._bytes + size <= 2 * self.max_bytes:
                break
            if other is not keep:
                self._forget(other)
        return self._bytes + size <= 2 * self.max_bytes


class _Loader:
    """One thread that loads runs one after the other, for as long as the process lives.

    Not trio's thread pool: handing each load back to the event loop and the next
    one out again left the thread idle a fraction of a millisecond per load, a
    quarter of a scan's time. One thread, because more only fight over the GIL
    (sqlite3 releases and takes it back for every row); and its own, so that
    read-ahead never makes a commit wait for a store thread.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Run, str, Callable, int, int, int, trio.lowlevel.TrioToken]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def submit(self, run: Run, label: str, load: Callable, ino: int, version: int, block_size: int) -> None:
        """Load ``run`` (``load(ino, start, end, version, block_size)``); ``run.done`` is set in the event loop."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fusesqlite-readahead", daemon=True)
            self._thread.start()
        self._jobs.put((run, label, load, ino, version, block_size, trio.lowlevel.current_trio_token()))

    def _work(self) -> None:
        while True:
            run, label, load, ino, version, block_size, token = self._jobs.get()
            data = None
            try:
                if not run.dropped:  # dropped: e.g. the file was read elsewhere meanwhile
                    data = load(ino, run.start, run.end, version, block_size)
                    log.debug("event=readahead path=%s ino=%d blocks=%d-%d", label, ino, run.start, run.end - 1)
            except Exception as e:  # noqa: BLE001 - a read of these blocks loads them itself and reports
                log.debug("event=readahead_failed path=%s ino=%d blocks=%d-%d cause=%s: %s",
                          label, ino, run.start, run.end - 1, type(e).__name__, e)
            try:
                token.run_sync_soon(_finish, run, data)
            except trio.RunFinishedError:
                pass  # unmounted meanwhile: nobody waits


def _finish(run: Run, data: bytearray | None) -> None:
    run.data = data
    run.done.set()
