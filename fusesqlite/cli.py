"""Command line: ``fusesqlite mount MOUNTPOINT [options]``.

Every error is one line on stderr that says what to do, and a non-zero exit.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from fusesqlite import __version__
from fusesqlite.log_format import FORMATS, setup_logging

DEFAULT_STORE_HELP = "$FUSESQLITE_STORE, else ~/.local/share/fusesqlite"


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{message} (see: fusesqlite --help)", code=2)


T = TypeVar("T")


def _number(text: str, kind: Callable[[str], T], test: Callable[[T], bool], wanted: str) -> T:
    """argparse type check whose message says what is wanted (argparse's own names the function)."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not test(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
    return value


def _positive(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive whole number")


def _non_negative(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a whole number, 0 or more")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


_DURATION_UNITS = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """``--keep``: a number and a unit (0s, 90min, 36h, 7d, 2w)."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min|m|h|d|w)", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use a number and s, min, h, d or w (36h, 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _retention(text: str) -> float:
    """``--retention``: a duration, or ``off`` (infinity: nothing is ever old enough)."""
    return float("inf") if text == "off" else _duration(text)


def _checked(check: Callable[[str], object], error: type[Exception], option: str) -> Callable[[str], str]:
    """An argparse type for a value ``check`` parses later anyway: a bad one is a usage
    error at once, in the words of ``check``'s ``error``."""

    def checked(text: str) -> str:
        try:
            check(text)
        except error as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{option}: ").removeprefix(f"{option} ")) from None
        return text

    return checked


def _simulate_spec(text: str) -> str:
    """A ``--simulate`` value."""
    from fusesqlite.store.simulated import SimulateSpecError, parse_simulate

    return _checked(parse_simulate, SimulateSpecError, "--simulate")(text)


def _metrics_address(text: str) -> str:
    """A ``--metrics`` value (prometheus_client loads only when one is given)."""
    from fusesqlite.metrics import MetricsError, parse_address

    return _checked(parse_address, MetricsError, "--metrics")(text)


def default_store() -> str:
    env = os.environ.get("FUSESQLITE_STORE")
    if env:
        return env
    import platformdirs

    return platformdirs.user_data_dir("fusesqlite")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusesqlite", description="SQLite databases on FUSE, pages in a transactional store.")
    p.add_argument("--version", action="version", version=f"fusesqlite {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    store = _Parser(add_help=False)  # the options that name a store
    store.add_argument(
        "--store",
        default=None,
        help=f"embedded store directory, or fdb: / fdb:/path/fdb.cluster for FoundationDB (default: {DEFAULT_STORE_HELP})",
    )
    store.add_argument(
        "--allow-shared-store", action="store_true",
        help="open an embedded store that other users can read or write (refused otherwise: they could read "
        "every file in it); a new store is always private to its owner",
    )
    store.add_argument(
        "--simulate", type=_simulate_spec, default=None, metavar="SPEC",
        help="put the store behind a simulated FoundationDB cluster, for tests and benchmarks: "
        "latency_ms=MS,commit_ms=MS,unknown_result=FRACTION,conflict=FRACTION[,seed=N] "
        "(docs/simulated-store.md)",
    )
    where = _Parser(add_help=False, parents=[store])  # and a volume in it
    where.add_argument("--volume", default="default", help="independent file system inside the store (default: default)")
    m = sub.add_parser("mount", parents=[where], help="mount a volume and serve it in the foreground")
    m.add_argument("mountpoint", help="an empty directory")
    m.add_argument(
        "--memory-mb", type=_positive, default=256,
        help="memory budget in MiB: block cache and uncommitted data; bigger transactions are staged in the store (default: 256)",
    )
    m.add_argument("--read-only", action="store_true", help="serve the latest committed version, refuse writes")
    m.add_argument(
        "--at", metavar="VERSION|TIME", default=None,
        help="serve the volume as it was at a version of `fusesqlite log`, or at a time (the newest version "
        "committed then: 2026-12-05T14:30, -10min, -2h, -7d, @SECONDS); read-only, never moves, takes no lease",
    )
    m.add_argument(
        "--lease-seconds", type=_positive_float, default=10.0,
        help="how long a mount that died keeps other mounts from writing a database it was writing (default: 10)",
    )
    m.add_argument(
        "--watch-limit", type=_non_negative, default=100, metavar="N",
        help="follow other mounts' commits of the files and directories this mount holds one by one, up to N of "
        "them (a FoundationDB watch each); holding more, or with 0, read the volume's log at every commit "
        "anywhere in it (default: 100)",
    )
    m.add_argument("--allow-other", action="store_true", help="let other users use the mount (FUSE allow_other)")
    m.add_argument(
        "--default-permissions", action="store_true",
        help="let the kernel check permissions even when only root can use the mount (mounted by root without "
        "--allow-other, where it is off: it refuses root nothing and costs two requests per small transaction); "
        "for hosts whose uid-0 processes run without CAP_DAC_OVERRIDE",
    )
    wb = m.add_mutually_exclusive_group()
    wb.add_argument(
        "--writeback-cache", dest="writeback_cache", action="store_const", const=True, default=None,
        help="let the kernel gather writes in its page cache until a commit point (the default on "
        "Linux 6.16 and later; before 6.16 a synchronous=OFF commit may miss pages still queued in the kernel)",
    )
    wb.add_argument(
        "--no-writeback-cache", dest="writeback_cache", action="store_const", const=False,
        help="send every write to the daemon at once (the default before Linux 6.16; slower)",
    )
    m.add_argument(
        "--busy-poll-us", type=_non_negative, default=50,
        help="after answering a request, look for the next one this many microseconds before sleeping: "
        "saves two wake-ups across CPUs per request in bursts (VACUUM, big transactions), at the price of "
        "that much CPU; 0 turns it off; off anyway when the daemon has one CPU (default: 50)",
    )
    m.add_argument(
        "--retention", type=_retention, default=None, metavar="DURATION|off",
        help="remove, in the background, versions older than DURATION that nothing needs (one mount of a volume "
        "at a time, every 10 minutes; as gc --keep); off keeps every version (default: 24h)",
    )
    m.add_argument(
        "--metrics", type=_metrics_address, default=None, metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics: PORT (on 127.0.0.1, e.g. 9464), HOST:PORT or "
        "[IPV6]:PORT; an address other than loopback only when named, e.g. 0.0.0.0:9464 (default: off)",
    )
    m.add_argument("--log-format", choices=FORMATS, default="text",
                   help="text: event=... lines; json: one JSON object per line, for log shippers (default: text)")
    m.add_argument("--debug", action="store_true", help="log every commit")
    lg = sub.add_parser("log", parents=[where], help="list the versions of a volume, newest first")
    lg.add_argument("path", nargs="?", default=None, help="only the versions that changed this path of the volume")
    lg.add_argument("--json", action="store_true", help="print a JSON list of {version, time, unix_time, mount, files}")
    lg.add_argument("--limit", type=_positive, default=None, metavar="N", help="at most N versions")
    lg.add_argument("--since", default=None, metavar="TIME",
                    help="only versions committed at or after TIME (2026-12-05T14:30, -10min, -2h, -7d, @SECONDS)")
    rs = sub.add_parser(
        "restore", parents=[where],
        help="make a path of the volume (a file, a directory, / for all) as it was at a version or time, "
        "as a new version; live mounts see it as a commit from another host",
    )
    rs.add_argument("path", help="a path inside the volume, e.g. /app.sqlite (a database's -wal comes along)")
    rs.add_argument("--to", required=True, metavar="VERSION|TIME",
                    help="a version of `fusesqlite log`, or a time (2026-12-05T14:30, -10min, -2h, -7d, @SECONDS)")
    ex = sub.add_parser("export", parents=[where],
                        help="copy files of the volume, as they were at a version, to a new local directory")
    ex.add_argument("paths", nargs="+", metavar="[PATH] DEST",
                    help="the volume's PATH (default /: everything) and DEST, a path that does not exist yet")
    ex.add_argument("--at", metavar="VERSION|TIME", default=None, help="the version to export (default: the latest)")
    im = sub.add_parser("import", parents=[where], help="copy a local directory tree into the volume, as one commit")
    im.add_argument("source", help="a local directory: what it holds goes into DEST_PATH")
    im.add_argument("dest", nargs="?", default="/", metavar="DEST_PATH",
                    help="a directory of the volume (made if missing; default /); names it has already are refused")
    st = sub.add_parser("status", parents=[store],
                        help="the store's volumes: versions, pins, live mounts, write leases, sizes")
    st.add_argument("--volume", default=None, help="only this volume (default: every volume of the store)")
    st.add_argument("--json", action="store_true", help="print it as JSON (fields: docs/operating.md)")
    cl = sub.add_parser("clone", parents=[store],
                        help="make a new volume that starts as another was at a version, in O(1) (copy-on-write)")
    cl.add_argument("source", help="the volume to clone")
    cl.add_argument("dest", help="the new volume's name")
    cl.add_argument("--at", metavar="VERSION|TIME", default=None, help="the version to start from (default: the latest)")
    pn = sub.add_parser("pin", parents=[where], help="keep a version from gc under a name (no NAME: list the pins)")
    pn.add_argument("name", nargs="?", default=None, help="the pin's name (a pin of that name is replaced)")
    pn.add_argument("--at", metavar="VERSION|TIME", default=None, help="the version to keep (default: the latest)")
    up = sub.add_parser("unpin", parents=[where], help="let gc remove a pinned version again")
    up.add_argument("name")
    g = sub.add_parser(
        "gc", parents=[where],
        help="remove what mounts that died left in the store, and with --keep the versions older than a window",
    )
    g.add_argument(
        "--staging-timeout", type=float, default=None,
        help="seconds after which another host's unfinished staging counts as abandoned (default: 120)",
    )
    g.add_argument(
        "--keep", type=_duration, default=None, metavar="DURATION",
        help="remove every version older than DURATION (0s, 90min, 36h, 7d) that no live mount, mount --at or "
        "pin needs; without it gc removes no version",
    )
    g.add_argument(
        "--vacuum", action="store_true",
        help="with --keep, on an embedded store: rewrite it, packing what is left (every other process's "
        "commits wait meanwhile); without it freed pages are given back, partly empty ones are kept for new data",
    )
    sub.add_parser(
        "upgrade", parents=[where],
        help="move a volume written by an older fusesqlite to this one's format (stop every mount of it first)",
    )
    return p


def retention_default() -> str:
    from fusesqlite.retention import DEFAULT_RETENTION

    return DEFAULT_RETENTION


#: options whose value may be a relative time (``-10min``), which argparse takes for an option
_TIME_OPTIONS = ("--at", "--since", "--to")


def _join_relative_times(argv: list[str]) -> list[str]:
    """``--at -10min`` as ``--at=-10min``: argparse reads a value that starts with '-'
    as the next option, and users write relative times that way."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in _TIME_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def run(argv: list[str] | None) -> None:
    args = build_parser().parse_args(_join_relative_times(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        raise CliError("no command given; try: fusesqlite mount MOUNTPOINT (see: fusesqlite --help)", code=2)
    if args.command == "status" and args.volume is None:  # every volume
        setup_logging(False, logging.WARNING)
        show_status(args.store or default_store(), args)
        return
    if args.command == "clone":
        setup_logging(False, logging.WARNING)
        clone(args.store or default_store(), args)
        return
    if not args.volume or "/" in args.volume:
        raise CliError(f"invalid volume name {args.volume!r}; use a non-empty name without '/'", code=2)
    store_spec = args.store or default_store()
    if args.command == "mount":
        setup_logging(args.debug, log_format=args.log_format)
        faulthandler.enable()  # a daemon that crashes leaves every thread's stack in its log
        from fusesqlite.mount import MountConfig, MountError, serve

        config = MountConfig(
            mountpoint=args.mountpoint,
            store=store_spec,
            volume=args.volume,
            memory_mb=args.memory_mb,
            allow_other=args.allow_other,
            read_only=args.read_only,
            lease_seconds=args.lease_seconds,
            watch_limit=args.watch_limit,
            writeback_cache=args.writeback_cache,
            default_permissions=args.default_permissions,
            busy_poll_us=args.busy_poll_us,
            allow_shared_store=args.allow_shared_store,
            simulate=args.simulate,
            at=args.at,
            retention_seconds=_retention(retention_default()) if args.retention is None else args.retention,
            metrics=args.metrics,
        )
        try:
            serve(config)
        except MountError as e:
            raise CliError(str(e)) from None
    elif args.command == "log":
        setup_logging(False, logging.WARNING)  # its output is the answer: no store_open line beside it
        show_log(store_spec, args)
    elif args.command == "restore":
        setup_logging(False, logging.WARNING)
        restore_path(store_spec, args)
    elif args.command == "gc":
        setup_logging(False)
        collect(store_spec, args.volume, args.staging_timeout, args.allow_shared_store, args.simulate)
        if args.keep is not None:
            collect_history(store_spec, args)
    elif args.command == "status":
        setup_logging(False, logging.WARNING)
        show_status(store_spec, args)
    elif args.command in ("export", "import"):
        setup_logging(False, logging.WARNING)
        transfer(store_spec, args)
    elif args.command in ("pin", "unpin"):
        setup_logging(False, logging.WARNING)
        pin(store_spec, args)
    elif args.command == "upgrade":
        setup_logging(False)
        upgrade(store_spec, args.volume, args.allow_shared_store, args.simulate)


def unreachable(e: Exception) -> CliError:
    """A store error as the one line every command prints."""
    return CliError(f"{e}; check --store and that the store is reachable")


def open_volume(store_spec: str, args: argparse.Namespace, author: str = ""):
    """The volume ``args`` name, existing (CliError, one line, if it cannot be read);
    ``author``: who its commits say made them (a mount id)."""
    from fusesqlite.store import StoreError, StoreNotPrivate, open_store
    from fusesqlite.volume import Volume, VolumeFormatError, VolumeNotFound

    if not store_spec.startswith("fdb:") and not os.path.isdir(os.path.expanduser(store_spec)):
        raise CliError(f"no store at {store_spec}; check --store (or $FUSESQLITE_STORE)")
    try:
        store = open_store(store_spec, allow_shared=args.allow_shared_store, simulate=args.simulate)
        volume = Volume(store, args.volume, author=author)
        volume.open(create=False)
    except (VolumeFormatError, VolumeNotFound, StoreNotPrivate) as e:
        raise CliError(str(e)) from None
    except StoreError as e:
        raise unreachable(e) from None
    return volume


def show_log(store_spec: str, args: argparse.Namespace) -> None:
    import json

    from fusesqlite import history
    from fusesqlite.store import StoreError

    volume = open_volume(store_spec, args)
    try:
        since = None if args.since is None else history.parse_time(args.since)
        found = history.changes(volume, path=args.path, limit=args.limit, since=since)
        if args.json:
            print(json.dumps([c.as_json() for c in found], indent=1))
            return
        print(f"{'VERSION':<12} {'TIME':<19}  {'MOUNT':<28} FILES")
        for c in found:
            print(f"{history.version_text(c.version):<12} {history.time_text(c.time):<19}  {c.mount:<28} "
                  + " ".join(c.files))
    except history.HistoryError as e:
        raise CliError(str(e)) from None
    except StoreError as e:
        raise unreachable(e) from None
    finally:
        volume.store.close()


def progress_bars() -> Callable[[str, int, int], None] | None:
    """A progress callback (what, done, total; total 0 if unknown) drawing tqdm bars on a
    terminal; None (quiet) when stderr is not one."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(what: str, done: int, total: int) -> None:
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(desc=what, total=total or None, unit="block", leave=False)
        bar.update(done - bar.n)

    return update


def restore_path(store_spec: str, args: argparse.Namespace) -> None:
    from fusesqlite import history
    from fusesqlite.identity import new_mount_id
    from fusesqlite.restore import RestoreError, restore
    from fusesqlite.store import StoreError
    from fusesqlite.volume import EntryChanged, HistoryCollected, StagingConflict, StaleWrite, WalHeld

    volume = open_volume(store_spec, args, author=new_mount_id())
    try:
        to = history.resolve(volume, args.to)
        print(restore(volume, args.path, to, progress=progress_bars()).summary())
    except history.HistoryError as e:
        raise CliError(str(e)) from None
    except WalHeld as e:
        raise CliError(f"{args.path} is open in WAL mode on another mount ({e}): close its connections there, "
                       "then run the restore again") from None
    except RestoreError as e:
        raise CliError(str(e)) from None
    except (StaleWrite, EntryChanged, StagingConflict) as e:
        raise CliError(f"{args.path} changed on a live mount during the restore ({e}); run it again") from None
    except HistoryCollected:
        raise CliError(f"version {args.to} was removed by gc during the restore; pick a newer one") from None
    except StoreError as e:
        raise unreachable(e) from None
    finally:
        volume.store.close()


def collect_history(store_spec: str, args: argparse.Namespace) -> None:
    from fusesqlite import history, retention
    from fusesqlite.store import StoreError

    volume = open_volume(store_spec, args)
    try:
        chosen, done = retention.collect(volume, args.keep, progress_bars())
        compacted = volume.store.compact(args.vacuum) if done.keys or args.vacuum else None
    except StoreError as e:
        raise CliError(f"{e}; check --store and that the store is reachable; gc can be run again") from None
    finally:
        volume.store.close()
    if done.horizon == 0:
        print("no version is older than --keep: nothing removed")
    else:
        print(f"kept every version from {history.version_text(done.horizon)} on ({chosen.because}); removed "
              f"{done.records} record, {done.entries} entry, {done.blocks} block and {done.log} log version(s)")
    if compacted:
        print(compacted)


def clone(store_spec: str, args: argparse.Namespace) -> None:
    from fusesqlite import history
    from fusesqlite.store import StoreError
    from fusesqlite.volume import Volume, VolumeExists

    for name in (args.source, args.dest):
        if not name or "/" in name:
            raise CliError(f"invalid volume name {name!r}; use a non-empty name without '/'", code=2)
    args.volume = args.source
    source = open_volume(store_spec, args)
    try:
        version = history.resolve(source, args.at) if args.at is not None else source.head()
        dest = Volume(source.store, args.dest)
        if source.store.transact(lambda tr: tr.get(dest.ks.meta())) is not None:
            raise VolumeExists(f"volume {args.dest!r} exists; name a new one")
        start = time.monotonic()
        dest.clone(source, version)
        took = time.monotonic() - start
    except (history.HistoryError, VolumeExists) as e:
        raise CliError(str(e)) from None
    except StoreError as e:
        raise unreachable(e) from None
    finally:
        source.store.close()
    print(f"cloned {args.source} at version {history.version_text(version)} as {args.dest} in {took * 1000:.0f} ms; "
          f"{args.source} keeps that version while {args.dest} exists (pin clone:{args.dest})")


def show_status(store_spec: str, args: argparse.Namespace) -> None:
    import json

    from fusesqlite import status
    from fusesqlite.store import StoreError, StoreNotPrivate, open_store
    from fusesqlite.volume import VolumeFormatError, VolumeNotFound

    embedded = not store_spec.startswith("fdb:")
    if embedded and not os.path.isdir(os.path.expanduser(store_spec)):
        raise CliError(f"no store at {store_spec}; check --store (or $FUSESQLITE_STORE)")
    try:
        store = open_store(store_spec, allow_shared=args.allow_shared_store, simulate=args.simulate)
    except StoreNotPrivate as e:
        raise CliError(str(e)) from None
    except StoreError as e:
        raise unreachable(e) from None
    try:
        found = status.store_status(store, store.description, os.path.expanduser(store_spec) if embedded else None,
                                    args.volume)
    except (VolumeFormatError, VolumeNotFound) as e:
        raise CliError(str(e)) from None
    except StoreError as e:
        raise unreachable(e) from None
    finally:
        store.close()
    print(json.dumps(found.as_json(), indent=1) if args.json else status.render(found))


def transfer(store_spec: str, args: argparse.Namespace) -> None:
    from fusesqlite import history, transfer
    from fusesqlite.identity import new_mount_id
    from fusesqlite.store import StoreError
    from fusesqlite.volume import EntryChanged

    if args.command == "export" and len(args.paths) > 2:
        raise CliError("export takes [PATH] DEST: at most two paths (see: fusesqlite export --help)", code=2)
    volume = open_volume(store_spec, args, author=new_mount_id())
    try:
        if args.command == "export":
            path, dest = args.paths if len(args.paths) == 2 else ["/", args.paths[0]]
            version = history.resolve(volume, args.at) if args.at is not None else volume.head()
            done = transfer.export(volume, path, dest, version, progress_bars())
            print(f"exported {path} at version {history.version_text(version)} to {dest}: {done.files} file(s), "
                  f"{done.directories} directory(ies), {done.bytes} bytes")
        else:
            got = transfer.import_tree(volume, args.source, args.dest, progress_bars())
            print(f"imported {args.source} into {args.dest} as version {history.version_text(got.version)}: "
                  f"{got.files} file(s), {got.directories} directory(ies), {got.bytes} bytes")
    except (history.HistoryError, transfer.TransferError) as e:
        raise CliError(str(e)) from None
    except EntryChanged as e:
        raise CliError(f"a name the import makes was created meanwhile ({e}); run it again") from None
    except OSError as e:
        raise CliError(f"{e.filename or ''}: {e.strerror or e}") from None
    except StoreError as e:
        raise unreachable(e) from None
    finally:
        volume.store.close()


def pin(store_spec: str, args: argparse.Namespace) -> None:
    from fusesqlite import history, retention
    from fusesqlite.store import StoreError
    from fusesqlite.volume import Volume

    volume = open_volume(store_spec, args)
    try:
        if args.command == "unpin":
            clone = args.name.removeprefix("clone:") if args.name.startswith("clone:") else None
            if clone and volume.store.transact(lambda tr: tr.get(Volume(volume.store, clone).ks.meta())) is not None:
                raise CliError(f"pin {args.name} keeps what volume {clone!r} reads (it is a clone of "
                               f"{args.volume!r}); it stays while that volume exists")
            if not retention.clear_pin(volume, args.name):
                raise CliError(f"volume {args.volume!r} has no pin {args.name!r}; list them with: fusesqlite pin")
            print(f"unpinned {args.name}")
        elif args.name is None:
            for name, version in sorted(retention.pins(volume).items()):
                print(f"{name}\t{history.version_text(version)}")
        else:
            version = history.resolve(volume, args.at) if args.at is not None else volume.head()
            retention.set_pin(volume, args.name, version)
            print(f"pinned version {history.version_text(version)} as {args.name}")
    except (history.HistoryError, retention.RetentionError) as e:
        raise CliError(str(e)) from None
    except StoreError as e:
        raise unreachable(e) from None
    finally:
        volume.store.close()


def collect(
    store_spec: str, volume_name: str, staging_timeout: float | None, allow_shared_store: bool = False,
    simulate: str | None = None,
) -> None:
    from fusesqlite import gc, retention
    from fusesqlite.identity import new_mount_id
    from fusesqlite.store import StoreError, StoreNotPrivate, open_store
    from fusesqlite.volume import Volume, VolumeFormatError

    try:
        volume = Volume(open_store(store_spec, allow_shared=allow_shared_store, simulate=simulate), volume_name)
        volume.open()
        timeout = gc.STAGING_TIMEOUT if staging_timeout is None else staging_timeout
        stagings, blocks = gc.reclaim_stagings(volume, new_mount_id(), timeout)
        calls = gc.reclaim_calls(volume)
        registrations = retention.clear_dead_registrations(volume)
    except VolumeFormatError as e:
        raise CliError(str(e)) from None
    except StoreNotPrivate as e:
        raise CliError(str(e)) from None  # it says what to run
    except StoreError as e:
        raise unreachable(e) from None
    print(f"removed {stagings} abandoned staging(s), {blocks} block(s), {calls} old call key(s), "
          f"{registrations} dead mount(s)' registration(s)")


def upgrade(store_spec: str, volume_name: str, allow_shared_store: bool = False, simulate: str | None = None) -> None:
    from fusesqlite.store import StoreError, StoreNotPrivate, open_store
    from fusesqlite.volume import FORMAT, Volume, VolumeFormatError

    log = logging.getLogger("fusesqlite.upgrade")
    try:
        volume = Volume(open_store(store_spec, allow_shared=allow_shared_store, simulate=simulate), volume_name)
        written = volume.upgrade(lambda read: log.info("event=upgrade_progress entry_versions_read=%d", read))
    except (VolumeFormatError, StoreNotPrivate) as e:
        raise CliError(str(e)) from None
    except StoreError as e:
        raise unreachable(e) from None
    if written is None:
        print(f"volume {volume_name!r} has format {FORMAT} already: nothing to do")
    else:
        print(f"volume {volume_name!r} upgraded to format {FORMAT} ({written} directory entries indexed)")


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except CliError as e:
        print(f"fusesqlite: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fusesqlite log | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
