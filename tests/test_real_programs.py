"""Real programs that use SQLite behave on a mount as on a local disk (DESIGN.md,
contract 1), in every write-back configuration of the mount.

- Fossil (Debian's ``fossil``), its repository in rollback-journal mode and in WAL
  mode (``fossil rebuild --wal``): init, open, 60 commits (edits, new files, files the
  user deletes), a close and open of the checkout every 20 commits, rebuild,
  test-integrity and a second checkout, with the repository (in the checkout's own
  directory), both checkouts and ``HOME`` (fossil's global configuration database)
  on the mount. ``fossil open`` and every ``fossil commit`` write two databases
  (the checkout's and the repository) in one transaction: SQLite creates, syncs and
  deletes a super-journal, and that unlink is the commit point. Commit dates and
  the user are fixed, so every artifact hash, the timeline, ``fossil ls`` and the
  files of a fresh checkout are the same on any file system; the test compares them
  to a run on a local disk, and again after a remount. In WAL mode every fossil
  process takes and gives back the database's WAL ownership in the store, which makes
  the workflow about twice as long as in rollback mode: those two variants are marked
  ``slow`` (``-m "not slow"`` leaves them out; the sqlite3 shell covers WAL quickly).
- The sqlite3 shell (Debian's ``sqlite3``), one process per statement list, in
  rollback-journal and WAL mode: the same output as on a local disk.
- CPython's own ``test_sqlite3`` (436 tests) with its working directory and
  ``TMPDIR`` on the mount (regrtest makes its work directory, the cwd where
  ``os_helper.TESTFN`` lives, under ``tempfile.gettempdir()``; ``temp_dir()`` uses
  ``mkdtemp``): the outcome of every test matches a run on a local disk. It takes
  a second or two on either, so CI runs all of it.

A failed step names the step, the program's output and the daemon's warning and
error lines (``event=...``).
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import pytest
from helpers import child_env

FOSSIL = shutil.which("fossil")

needs_fossil = pytest.mark.skipif(
    FOSSIL is None, reason="fossil is not installed: apt-get install fossil")

#: the mount as a user gets it (the kernel's writeback cache where the kernel is new
#: enough), and without the writeback cache (``slow``: the pure-Python pass, which
#: leaves the cache off anyway, would run the default twice)
WRITEBACK = [
    pytest.param((), id="default"),
    pytest.param(("--no-writeback-cache",), id="no-writeback-cache", marks=pytest.mark.slow),
]

COMMITS = 60
#: close and open the checkout again after this many commits
REOPEN_EVERY = 20
USER = "tester"

#: a step of a real program must not hang the run on a stuck mount
STEP_TIMEOUT = 120.0


def cache_mode(m) -> str:
    """How the daemon mounted, for a timing line: its writeback_cache=... field."""
    found = re.search(r"event=mounted .*?(writeback_cache=\S+)", m.log_text())
    return found.group(1) if found else "writeback_cache=?"


def daemon_complaints(m) -> str:
    """The daemon's log lines that say something went wrong (a failure's evidence)."""
    lines = [ln for ln in m.log_text().splitlines()
             if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln or "_failed" in ln or "_refused" in ln]
    return "\n".join(lines[-40:]) or "(no warning or error lines)"


# ---------------------------------------------------------------------------
# fossil


class StepFailed(Exception):
    """A step of a real program exited non-zero (or hung): the message says which and why."""


@dataclass
class FossilRun:
    """One run of the fossil workflow under ``base``; what it produced, to compare."""
    base: Path
    wal: bool = False  # the repository in WAL mode (``fossil rebuild --wal``)
    seconds: dict[str, float] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)

    @property
    def repo(self) -> Path:
        # in the checkout's own directory, as a user would start a project: the
        # super-journal of ``fossil open`` is then created and deleted next to the
        # checkout database that ``fossil close`` deleted before
        return self.base / "co" / "r.fossil"

    def env(self) -> dict[str, str]:
        # HOME holds ~/.fossil, the global configuration database fossil opens with
        # every checkout; TZ fixes how the timeline prints the fixed commit dates
        return child_env({"HOME": str(self.base / "home"), "USER": USER, "FOSSIL_USER": USER,
                          "TZ": "UTC", "LC_ALL": "C"})

    def fossil(self, step: str, *args: str, cwd: Path | None = None) -> str:
        t0 = time.monotonic()
        try:
            p = subprocess.run([FOSSIL, *args], cwd=cwd or self.base / "co", env=self.env(),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"step {step!r}: fossil {' '.join(args)} did not finish in {STEP_TIMEOUT:.0f} s")
        kind = step.split()[0]  # "commit 7" adds to "commit"
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.monotonic() - t0
        if p.returncode != 0:
            raise StepFailed(f"step {step!r}: fossil {' '.join(args)} exited {p.returncode}\n"
                             f"stdout: {p.stdout.strip()[-2000:]}\nstderr: {p.stderr.strip()[-2000:]}")
        return p.stdout

    def edit(self, i: int) -> bool:
        """Commit i's changes to the checkout; True when a file was removed (addremove)."""
        co = self.base / "co"
        with open(co / f"f{i % 7}.txt", "a") as f:
            f.write(f"line {i}\n" * (i + 1))
        (co / "sub" / f"new{i}.txt").write_text(f"new {i}\n" * 50)
        if i % 6 == 5:
            (co / "sub" / f"new{i - 3}.txt").unlink()
            return True
        return False

    def workflow(self) -> None:
        for d in ("home", "co", "co2"):
            (self.base / d).mkdir(parents=True)
        self.fossil("init", "init", "--date-override", "2024-01-01T00:00:00", "-A", USER, str(self.repo))
        if self.wal:
            self.fossil("rebuild --wal", "rebuild", "--wal", str(self.repo))
        self.fossil("open", "open", str(self.repo))
        (self.base / "co" / "sub").mkdir()
        for i in range(COMMITS):
            if i and i % REOPEN_EVERY == 0:
                # close deletes the checkout database, open creates it again under its name
                self.fossil(f"close {i}", "close")
                self.fossil(f"open {i}", "open", "--keep", str(self.repo))
            removed = self.edit(i)
            if removed:
                self.fossil(f"addremove {i}", "addremove")
            else:
                self.fossil(f"add {i}", "add", ".")
            self.fossil(f"commit {i}", "commit", "-m", f"commit {i}", "--no-warnings", "--nosign",
                        "--user-override", USER, "--date-override", f"2024-01-02T{i // 60:02d}:{i % 60:02d}:00")
        self.fossil("rebuild", "rebuild", str(self.repo))
        self.observe()
        # a second checkout of the rebuilt repository: its files are the repository's content
        self.fossil("open co2", "open", str(self.repo), cwd=self.base / "co2")
        self.results["co2 files"] = tree_digest(self.base / "co2")
        self.results["co files"] = tree_digest(self.base / "co")

    def attempt(self, steps) -> str | None:
        """Run steps(); the failed step's message, or None when every step succeeded."""
        try:
            steps()
        except StepFailed as e:
            return str(e)
        return None

    def observe(self, tag: str = "") -> None:
        """What the repository holds, as fossil reports it (identical on any file system)."""
        self.results["test-integrity" + tag] = self.fossil(
            "test-integrity" + tag, "test-integrity", "-R", str(self.repo))
        self.results["timeline" + tag] = self.fossil("timeline" + tag, "timeline", "-n", "0", "-W", "0")
        self.results["ls" + tag] = self.fossil("ls" + tag, "ls", "-v")
        self.results["changes" + tag] = self.fossil("changes" + tag, "changes")
        self.results["sql" + tag] = self.fossil(
            "sql" + tag, "sql", "-R", str(self.repo),
            "SELECT count(*), sum(size) FROM blob; SELECT uuid FROM blob ORDER BY uuid;")


def tree_digest(root: Path) -> str:
    """Every file under root but fossil's own databases (whose bytes hold random
    codes and local times): path, size, sha256."""
    lines = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith((".fslckout", "_FOSSIL_", "r.fossil")):
            data = p.read_bytes()
            lines.append(f"{p.relative_to(root)} {len(data)} {hashlib.sha256(data).hexdigest()}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def local_fossil(tmp_path_factory) -> FossilRun:
    """The workflow run once on a local disk: what every mount must produce."""
    if FOSSIL is None:
        pytest.skip("fossil is not installed: apt-get install fossil")
    run = FossilRun(tmp_path_factory.mktemp("fossil-local") / "local")
    t0 = time.monotonic()
    failed = run.attempt(run.workflow)
    if failed:
        pytest.fail(f"on a local disk: {failed}", pytrace=False)
    run.seconds["total"] = time.monotonic() - t0
    return run


@needs_fossil
def test_fossil_workflow_is_the_same_on_every_local_run(local_fossil, tmp_path):
    """The comparison with a mount means something only if two local runs agree
    exactly, the repository in WAL mode or not."""
    again = FossilRun(tmp_path / "again", wal=True)
    again.workflow()
    assert again.results == local_fossil.results
    assert local_fossil.results["timeline"].count("commit ") == COMMITS
    integrity = local_fossil.results["test-integrity"]
    assert "0 errors" in integrity and "integrity-check: ok" in integrity, integrity


@needs_fossil
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mount_args", WRITEBACK)
@pytest.mark.parametrize("wal", [pytest.param(False, id="rollback"), pytest.param(True, id="wal", marks=pytest.mark.slow)])
def test_fossil_workflow_on_a_mount_matches_a_local_disk(mounts, local_fossil, mount_args, wal):
    """The local run is in rollback mode: fossil reports the same in either mode."""
    local = local_fossil
    m = mounts(extra_args=mount_args)
    run = FossilRun(m / "work", wal=wal)
    t0 = time.monotonic()
    failed = run.attempt(run.workflow)
    if failed:
        pytest.fail(f"{failed}\n--- daemon warnings/errors ---\n{daemon_complaints(m)}", pytrace=False)
    mount_s = time.monotonic() - t0
    slowest = sorted(run.seconds.items(), key=lambda kv: -kv[1])[:5]
    print(f"fossil workflow ({COMMITS} commits): local disk {local.seconds['total']:.2f} s, "
          f"mount {' '.join(mount_args) or 'default'} ({cache_mode(m)}, wal={wal}) {mount_s:.2f} s; per step: "
          + ", ".join(f"{k} {v:.2f}" for k, v in slowest))

    for key, want in local.results.items():
        assert run.results[key] == want, f"{key} differs from the local disk's"

    # the store, not the kernel's cache, holds it: the same after a remount
    m2 = mounts.remount(m)
    failed = run.attempt(lambda: run.observe(" after remount"))
    if failed:
        pytest.fail(f"{failed}\n--- daemon warnings/errors ---\n{daemon_complaints(m2)}", pytrace=False)
    for key in ("test-integrity", "timeline", "ls", "changes", "sql"):  # as on the local disk
        assert run.results[key + " after remount"] == local.results[key], f"{key} after a remount differs"
    assert tree_digest(run.base / "co2") == local.results["co2 files"]


# ---------------------------------------------------------------------------
# the sqlite3 shell

SQLITE3 = shutil.which("sqlite3")

#: one shell process per statement list, as a user types them: every process opens the
#: database (and in WAL mode its -shm) again, and the last close checkpoints
SHELL_SESSION = [
    "PRAGMA journal_mode={mode}; CREATE TABLE t(x INTEGER PRIMARY KEY, v TEXT); INSERT INTO t(v) VALUES ('a');",
    *["INSERT INTO t(v) SELECT v || x FROM t;"] * 10,
    "DELETE FROM t WHERE x % 3 = 0; VACUUM;",
    "SELECT count(*), sum(length(v)) FROM t; PRAGMA integrity_check; PRAGMA journal_mode;",
]


def shell_session(db: Path, mode: str) -> list[str]:
    """The outputs of SHELL_SESSION's processes; a failure names the statement and its error."""
    outs = []
    for sql in SHELL_SESSION:
        sql = sql.format(mode=mode)
        p = subprocess.run([SQLITE3, "-bail", str(db), sql], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=STEP_TIMEOUT, env=child_env())
        if p.returncode != 0:
            raise StepFailed(f"step {sql!r}: sqlite3 exited {p.returncode}: {p.stderr.strip()}")
        outs.append(p.stdout)
    return outs


@pytest.mark.skipif(SQLITE3 is None, reason="the sqlite3 shell is not installed: apt-get install sqlite3")
@pytest.mark.parametrize("mount_args", WRITEBACK)
@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite3_shell_session_on_a_mount_matches_a_local_disk(mounts, tmp_path, mount_args, journal_mode):
    (tmp_path / "local").mkdir()
    local = shell_session(tmp_path / "local" / "shell.db", journal_mode)
    m = mounts(extra_args=mount_args)
    (m / "work").mkdir()
    try:
        on_mount = shell_session(m / "work" / "shell.db", journal_mode)
    except StepFailed as e:
        failed = str(e)
    else:
        failed = None
    if failed:
        pytest.fail(f"{failed}\n--- daemon warnings/errors ---\n{daemon_complaints(m)}", pytrace=False)
    assert on_mount == local
    left = sorted(p.name for p in (m / "work").iterdir())
    assert left == sorted(p.name for p in (tmp_path / "local").iterdir()), left  # as the last close left them


# ---------------------------------------------------------------------------
# CPython's test_sqlite3


def have_test_sqlite3() -> bool:
    p = subprocess.run([sys.executable, "-c", "import test.test_sqlite3"], capture_output=True)
    return p.returncode == 0


@dataclass
class Regrtest:
    """One ``python -m test test_sqlite3`` run: the outcome of every test, by test id."""
    outcomes: dict[str, str]
    messages: dict[str, str]
    output: str
    seconds: float


def run_test_sqlite3(where: Path, report: Path) -> Regrtest:
    """``python -m test test_sqlite3`` with its cwd and TMPDIR at where; the JUnit report
    (the outcome of each test) is written to report, off the file system under test."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "test", "test_sqlite3", "--header", "--junit-xml", str(report)],
                       cwd=where, env=child_env({"TMPDIR": str(where)}), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=STEP_TIMEOUT)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    cwd = re.search(r"^== cwd: (.*)$", out, re.M)
    assert cwd and Path(cwd.group(1)).is_relative_to(where), \
        f"regrtest did not work under {where}: {cwd.group(0) if cwd else 'no cwd line'}\n{out[-2000:]}"
    assert report.exists(), f"test_sqlite3 wrote no report (exit {p.returncode}):\n{out[-3000:]}"
    outcomes, messages = {}, {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = case.attrib["name"]
        verdicts = [c for c in case if c.tag in ("failure", "error", "skipped")]
        outcomes[name] = verdicts[0].tag if verdicts else "ok"
        if verdicts:  # a traceback's last line names the exception
            text = (verdicts[0].text or verdicts[0].get("message") or "").strip()
            messages[name] = text.splitlines()[-1] if text else ""
    assert outcomes, f"no test results in the report of test_sqlite3 (exit {p.returncode}):\n{out[-3000:]}"
    return Regrtest(outcomes, messages, out, took)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mount_args", WRITEBACK)
def test_cpython_test_sqlite3_on_a_mount_matches_a_local_disk(mounts, tmp_path, mount_args):
    if not have_test_sqlite3():
        pytest.skip(f"CPython's test package is not installed for {sys.executable}: "
                    f"apt-get install libpython3.{sys.version_info.minor}-testsuite")
    (tmp_path / "local").mkdir()
    local = run_test_sqlite3(tmp_path / "local", tmp_path / "local.xml")

    m = mounts(extra_args=mount_args)
    (m / "work").mkdir()
    on_mount = run_test_sqlite3(m / "work", tmp_path / "mount.xml")
    print(f"test_sqlite3 ({len(on_mount.outcomes)} tests): local disk {local.seconds:.2f} s, "
          f"mount {' '.join(mount_args) or 'default'} ({cache_mode(m)}) {on_mount.seconds:.2f} s")

    names = local.outcomes.keys() | on_mount.outcomes.keys()
    differ = sorted(t for t in names if local.outcomes.get(t) != on_mount.outcomes.get(t))
    if differ:
        lines = "\n".join(f"  {t}: local {local.outcomes.get(t)}, mount {on_mount.outcomes.get(t)}: "
                          f"{on_mount.messages.get(t, '')}" for t in differ)
        pytest.fail(f"{len(differ)} of {len(local.outcomes)} tests end otherwise on the mount:\n{lines}\n"
                    f"--- daemon warnings/errors ---\n{daemon_complaints(m)}", pytrace=False)
