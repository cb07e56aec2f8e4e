#!/usr/bin/env python3
"""Run SQLite's own TCL test files on a fusesqlite mount and on a local disk, and compare.

    python3 scripts/conformance.py --list tests/conformance/ci.txt
    python3 scripts/conformance.py pager1.test wal.test --mount-args=--no-writeback-cache

Each test file runs twice under ``testfixture`` (SQLite's test harness, built by
bench/build_testfixture.sh): once with its working directory (and SQLITE_TMPDIR)
in a fresh directory on a mount this script starts, once in a fresh directory on
the local disk. A file *matches* when both runs end the same way (completed,
crashed or timed out) with the same set of failing test names: some tests fail on
any disk (for instance the read-only tests when run as root), so the local disk,
not zero failures, is the reference. Exit status: 0 when every file matches, 1 when
one does not, 2 when the run could not be set up.

The script needs only the standard library and a fusesqlite that
``python3 -m fusesqlite mount`` can start; it does not import fusesqlite.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "bench" / "build_testfixture.sh"
log = logging.getLogger("conformance")

#: daemon log lines worth showing next to a file's result
DAEMON_LOG_PATTERN = re.compile(r"event=commit_failed|Traceback|\bERROR\b|\bCRITICAL\b|\bWARNING\b")
MAX_DAEMON_LINES = 40
#: daemon log lines that make a file a mismatch even where SQLite's results agree: a
#: commit the daemon failed is an error some call got that a local disk never gives
DAEMON_FAILURE_PATTERN = re.compile(r"event=commit_failed|Traceback|\bCRITICAL\b")

SUMMARY_RE = re.compile(r"^(\d+) errors out of (\d+) tests\b", re.M)
FAIL_LIST_RE = re.compile(r"^!Failures on these tests:(.*)$", re.M)
EXPECTED_RE = re.compile(r"^! (\S+) expected: ", re.M)
ERROR_RE = re.compile(r"^(\S+)\.\.\.\s*\nError: ", re.M)
LEFT_OPEN_RE = re.compile(r"^(\d+) files were left open$", re.M)
UNFREED_RE = re.compile(r"^Unfreed memory: ", re.M)
STARTED_RE = re.compile(r"^\S+\.\.\.", re.M)  # "name..." as each test starts


# ---------------------------------------------------------------------------
# one run of one file


@dataclasses.dataclass
class Run:
    """How one test file ended in one place.

    ``status`` is ``ok``/``failed`` when testfixture printed its summary,
    ``crashed`` when it exited without one, ``timeout`` when it was killed.
    ``failures`` are test names, plus ``<files-left-open>`` and
    ``<unfreed-memory>`` when testfixture's epilogue reported those.
    """

    status: str
    failures: list[str]
    seconds: float
    tests: int | None = None
    reason: str = ""
    output: str = ""

    @property
    def ending(self) -> str:
        return "completed" if self.status in ("ok", "failed") else self.status


def parse_output(text: str) -> tuple[list[str], int | None, bool]:
    """(failing names, number of tests, whether the summary line was printed)."""
    summary = SUMMARY_RE.search(text)
    names: list[str] = []
    fail_list = FAIL_LIST_RE.search(text)
    if fail_list:
        names = fail_list.group(1).split()
    else:
        # no summary (a crash or a timeout): the failures printed so far
        names = EXPECTED_RE.findall(text) + ERROR_RE.findall(text)
    if LEFT_OPEN_RE.search(text):
        names.append("<files-left-open>")
    if UNFREED_RE.search(text):
        names.append("<unfreed-memory>")
    names = sorted(set(names))
    return names, int(summary.group(2)) if summary else None, summary is not None


def last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()[:200]
    return "(no output)"


class Stopped(Exception):
    """The run was interrupted: no new test process starts."""


class Children:
    """Process groups started by this script, so that Ctrl-C can end them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pgids: set[int] = set()
        self.stopping = False

    def add(self, pgid: int) -> None:
        with self._lock:
            self._pgids.add(pgid)
            if self.stopping:  # started while kill_all ran
                kill_group(pgid)

    def discard(self, pgid: int) -> None:
        with self._lock:
            self._pgids.discard(pgid)

    def kill_all(self) -> None:
        with self._lock:
            self.stopping = True
            pgids = list(self._pgids)
        for pgid in pgids:
            kill_group(pgid)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_file(testfixture: Path, test_path: Path, rundir: Path, out_path: Path, timeout: float,
             children: Children) -> Run:
    """Run one test file in ``rundir`` (created fresh) with its output in ``out_path``.

    testfixture itself changes into ``rundir/testdir`` (tester.tcl's --testdir
    default), and finds tester.tcl next to the test file; multi-process tests start
    further testfixture processes, which share its process group and die with it.
    """
    if children.stopping:
        raise Stopped
    if rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True)
    env = dict(os.environ, SQLITE_TMPDIR=str(rundir))
    start = time.monotonic()
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([str(testfixture), str(test_path)], cwd=rundir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        children.add(proc.pid)
        try:
            rc = proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:  # stuck in a file system request
                rc = None
        finally:
            kill_group(proc.pid)  # children a finished test left behind
            children.discard(proc.pid)
    seconds = time.monotonic() - start
    text = out_path.read_text(errors="replace")
    failures, tests, completed = parse_output(text)
    if timed_out:
        started = len(STARTED_RE.findall(text))
        status, reason = "timeout", (f"killed after {timeout:.0f}s, {started} tests started, "
                                     f"{len(failures)} failed; last line: {last_line(text)}")
        if rc is None:
            reason += " (did not exit after SIGKILL)"
    elif completed:
        status, reason = ("failed" if failures else "ok"), ""
    else:
        how = f"signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
        status, reason = "crashed", f"{how} without a summary; last line: {last_line(text)}"
    return Run(status, failures, round(seconds, 2), tests, reason, str(out_path))


# ---------------------------------------------------------------------------
# the mount


def is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            # /proc/mounts writes space, tab, newline and backslash as \ooo
            if len(fields) > 1 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                                          fields[1]) == target:
                return True
    return False


class Mount:
    """``python3 -m fusesqlite mount`` in a child process, its log in a file."""

    def __init__(self, mountpoint: Path, store: Path, args: list[str], log_path: Path):
        self.mountpoint = mountpoint
        self.store = store
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.restarts = -1

    def start(self, timeout: float = 30) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fusesqlite", "mount", str(self.mountpoint),
               "--store", str(self.store), *self.args]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, cwd=REPO, start_new_session=True)
        self.restarts += 1
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise SystemExit(f"fusesqlite mount exited with status {self.proc.returncode}: "
                                 f"see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{self.mountpoint} not mounted after {timeout:.0f}s: see {self.log_path}")
            time.sleep(0.05)
        log.info("event=mounted mountpoint=%s args=%s", self.mountpoint, shlex.join(self.args))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and is_mounted(self.mountpoint)

    def ensure(self) -> str:
        """Restart a daemon that died; returns a note for the results, or ''."""
        if self.alive():
            return ""
        rc = self.proc.poll() if self.proc else None
        note = f"mount daemon gone (exit status {rc}); remounted"
        log.error("event=mount_lost rc=%s action=remount", rc)
        self.stop()
        self.start()
        return note

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_lines(self, start: int, end: int) -> list[str]:
        """The notable daemon log lines written between two log sizes."""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            chunk = f.read(max(0, end - start)).decode(errors="replace")
        lines = [ln for ln in chunk.splitlines() if DAEMON_LOG_PATTERN.search(ln)]
        if len(lines) > MAX_DAEMON_LINES:
            lines = lines[:MAX_DAEMON_LINES] + [f"... {len(lines) - MAX_DAEMON_LINES} more in {self.log_path}"]
        return lines

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, then a lazy unmount: never leaves a mount behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("event=mount_stop_slow action=SIGKILL pid=%d", self.proc.pid)
                self.proc.kill()
                self.proc.wait(30)
        for cmd in (["fusermount3", "-u"], ["fusermount3", "-uz"], ["umount", "-l"]):
            if not is_mounted(self.mountpoint):
                break
            subprocess.run([*cmd, str(self.mountpoint)], capture_output=True, timeout=30)


# ---------------------------------------------------------------------------
# the comparison


@dataclasses.dataclass
class FileResult:
    name: str
    local: Run
    mount: Run
    daemon_log: list[str]
    note: str = ""

    @property
    def daemon_failed(self) -> bool:
        return any(DAEMON_FAILURE_PATTERN.search(line) for line in self.daemon_log)

    @property
    def match(self) -> bool:
        return (
            self.local.ending == self.mount.ending and self.local.failures == self.mount.failures
            and not self.daemon_failed
        )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["match"] = self.match
        d["only_local"] = sorted(set(self.local.failures) - set(self.mount.failures))
        d["only_mount"] = sorted(set(self.mount.failures) - set(self.local.failures))
        return d


def describe(run: Run) -> str:
    if run.status == "ok":
        return "ok"
    if run.status == "failed":
        return f"{len(run.failures)} failed"
    return run.status + (f" ({len(run.failures)} failed)" if run.failures else "")


def print_row(r: FileResult, width: int) -> None:
    verdict = "match" if r.match else "MISMATCH"
    print(f"{r.name:<{width}} {verdict:<9} {describe(r.local):<18} {describe(r.mount):<18} "
          f"{r.local.seconds:>8.1f} {r.mount.seconds:>8.1f}", flush=True)


def print_details(r: FileResult) -> None:
    print(f"\n== {r.name}: local {describe(r.local)}, mount {describe(r.mount)}")
    only_mount = sorted(set(r.mount.failures) - set(r.local.failures))
    only_local = sorted(set(r.local.failures) - set(r.mount.failures))
    if only_mount:
        print("   failing only on the mount: " + " ".join(only_mount[:60])
              + (f" ... ({len(only_mount)} in all)" if len(only_mount) > 60 else ""))
    if only_local:
        print("   failing only on the local disk: " + " ".join(only_local[:60]))
    for side, run in (("local", r.local), ("mount", r.mount)):
        if run.reason:
            print(f"   {side}: {run.reason}")
    if r.note:
        print(f"   note: {r.note}")
    if r.daemon_failed:
        print("   the daemon failed a commit or crashed during this file (lines below)")
    for line in r.daemon_log:
        print(f"   daemon: {line}")
    print(f"   output: {r.local.output}  {r.mount.output}")


# ---------------------------------------------------------------------------
# command line


def read_list(path: Path) -> list[str]:
    """Test file names from a list: one a line, ``#`` starts a comment."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def find_testfixture(cache: str | None) -> Path:
    cmd = ["sh", str(BUILD_SCRIPT)] + ([cache] if cache else [])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise SystemExit(f"building testfixture failed (see above): run {shlex.join(cmd)}")
    return Path(r.stdout.strip().splitlines()[-1])


def source_of(testfixture: Path) -> Path:
    """The source tree of a testfixture build: the TOP line of the Makefile beside it."""
    makefile = testfixture.parent / "Makefile"
    if makefile.exists():
        m = re.search(r"^TOP\s*=\s*(\S+)", makefile.read_text(), re.M)
        if m:
            return Path(m.group(1))
    raise SystemExit(f"no Makefile with TOP = ... beside {testfixture}: pass --sqlite-src DIR")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="test files: names in SRC/test (pager1.test) or paths")
    p.add_argument("--list", action="append", type=Path, default=[],
                   help="a file listing test files, one a line, # comments (repeatable)")
    p.add_argument("--testfixture", type=Path,
                   help="the testfixture binary (default: built by bench/build_testfixture.sh)")
    p.add_argument("--cache", help="CACHE_DIR for bench/build_testfixture.sh")
    p.add_argument("--sqlite-src", type=Path,
                   help="SQLite source tree holding test/ (default: TOP from the Makefile beside testfixture)")
    p.add_argument("--mount-args", default="",
                   help="extra arguments for fusesqlite mount, one string: --mount-args=--no-writeback-cache")
    p.add_argument("--timeout", type=float, default=300, help="seconds per file and place (default 300)")
    p.add_argument(
        "--slowdown", type=float, default=20,
        help="a file on the mount may also take this many times its time on the local disk, if that is "
        "longer than --timeout (default 20: walcrash3.test takes about 90 s locally, 700-1000 s on a mount)",
    )
    p.add_argument("--jobs", type=int, default=1,
                   help="files run at once (default 1; daemon log lines are attributed to a file "
                        "only when this is 1)")
    p.add_argument("--work", type=Path,
                   help="working directory on the local disk: runs, outputs, store, mountpoint "
                        "(default: a new directory under /var/tmp, removed unless --keep or a file "
                        "mismatches)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    a = parse_args(argv)
    names = [n for lst in a.list for n in read_list(lst)] + a.files
    if not names:
        print("no test files: name some, or pass --list tests/conformance/ci.txt", file=sys.stderr)
        return 2
    testfixture = (a.testfixture or find_testfixture(a.cache)).resolve()
    if not os.access(testfixture, os.X_OK):
        print(f"{testfixture} is not an executable: build it with bench/build_testfixture.sh", file=sys.stderr)
        return 2
    src = (a.sqlite_src or source_of(testfixture)).resolve()
    tests = []
    for n in names:
        path = Path(n) if "/" in n else src / "test" / n
        if not path.is_file():
            print(f"{path} not found: name files of {src / 'test'}", file=sys.stderr)
            return 2
        tests.append(path)

    # the daemon runs the code of the tree at its start: the results belong to that revision
    try:  # a tree without git (an unpacked archive) runs all the same
        revision = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                                  capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        revision = "unknown"
    work = a.work or Path(tempfile.mkdtemp(prefix="fusesqlite-conformance-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    mount = Mount(work / "mnt", work / "store", shlex.split(a.mount_args), work / "daemon.log")
    children = Children()
    results: list[FileResult] = []
    width = max(len(t.name) for t in tests)
    log_lock = threading.Lock()  # one mount run at a time reads the log bounds consistently

    def one(test: Path) -> FileResult:
        name = test.name
        local = run_file(testfixture, test, work / "local" / name, work / "out" / f"{name}.local.txt",
                         a.timeout, children)
        with log_lock:
            note = mount.ensure()
            log_start = mount.log_size()
        mrun = run_file(testfixture, test, mount.mountpoint / name, work / "out" / f"{name}.mount.txt",
                        max(a.timeout, a.slowdown * local.seconds), children)
        with log_lock:
            lines = mount.log_lines(log_start, mount.log_size())
            if not mount.alive():
                note = (note + "; " if note else "") + "mount daemon died during this file"
        for d in (work / "local" / name, mount.mountpoint / name):
            try:
                shutil.rmtree(d)
            except OSError as e:
                note = (note + "; " if note else "") + f"could not remove {d}: {e}"
        return FileResult(name, local, mrun, lines, note)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    interrupted = False
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs))
    try:
        mount.start()
        print(f"{'file':<{width}} {'result':<9} {'local':<18} {'mount':<18} {'s local':>8} {'s mount':>8}",
              flush=True)
        futures = [pool.submit(one, t) for t in tests]
        for fut in futures:
            r = fut.result()
            results.append(r)
            print_row(r, width)
    except (KeyboardInterrupt, Stopped):
        interrupted = True
        print("\ninterrupted: stopping the test processes and the mount", file=sys.stderr)
    finally:
        children.kill_all()
        pool.shutdown(wait=True, cancel_futures=True)
        mount.stop()

    for r in results:
        if not r.match:
            print_details(r)
    matching = sum(r.match for r in results)
    t_local = sum(r.local.seconds for r in results)
    t_mount = sum(r.mount.seconds for r in results)
    ratio = f" ({t_mount / t_local:.1f}x)" if t_local > 0 else ""
    print(f"\n{matching} of {len(results)} files match the local disk"
          + (f" ({len(tests) - len(results)} not run: interrupted)" if interrupted else ""))
    print(f"time: mount {t_mount:.0f}s, local disk {t_local:.0f}s{ratio}; "
          f"wall {time.monotonic() - started:.0f}s; mount args: {a.mount_args or '(default)'}; "
          f"fusesqlite {revision}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "fusesqlite_revision": revision,
            "testfixture": str(testfixture),
            "sqlite_src": str(src),
            "mount_args": shlex.split(a.mount_args),
            "timeout": a.timeout,
            "slowdown": a.slowdown,
            "interrupted": interrupted,
            "summary": {"files": len(results), "matching": matching,
                        "seconds_local": round(t_local, 1), "seconds_mount": round(t_mount, 1)},
            "mismatching": [r.name for r in results if not r.match],
            "files": [r.to_json() for r in results],
            "daemon_log": str(mount.log_path),
        }, indent=1))
    if a.keep or a.work or matching < len(results):
        print(f"outputs and daemon log kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    return 0 if matching == len(results) == len(tests) else 1


if __name__ == "__main__":
    sys.exit(main())
