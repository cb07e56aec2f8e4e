"""WAL across mounts is refused, never lossy (DESIGN.md contract 7).

SQLite's WAL index (-shm) lives in one daemon's memory, so one mount at a time may
have a database in WAL mode: another mount's SQLite gets "unable to open database
file" (its open of -shm or -wal is refused with EBUSY) and its daemon logs
``event=wal_refused`` naming the holder. docs/many-mounts.md, "WAL and several mounts".
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest
from test_many_mounts import query, wait_for

#: a WAL connection on argv[1] that writes a row every argv[2] seconds until stdin closes
HOLD_WAL = r"""
import sqlite3, sys, threading
con = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, src TEXT)")
print("ready", flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
n = 0
while not stop.wait(float(sys.argv[2])):
    con.execute("INSERT INTO t(src) VALUES ('holder')")
    n += 1
con.close()
print(n, flush=True)
"""

#: open argv[1] and read it: prints "ok N" or "error MESSAGE"
TRY_OPEN = r"""
import sqlite3, sys
try:
    con = sqlite3.connect(sys.argv[1], timeout=2, isolation_level=None)
    if len(sys.argv) > 2:
        con.execute("PRAGMA journal_mode=" + sys.argv[2])
    n = con.execute("SELECT count(*) FROM t").fetchone()[0]
    con.close()
    print("ok", n)
except sqlite3.Error as e:
    print("error", e)
"""

#: for argv[2] seconds: connect to argv[1] in WAL mode, commit up to 20 single-row
#: transactions, close; prints JSON {"acked": [ids whose COMMIT returned], "errors": {...}}
WAL_WRITER = r"""
import json, sqlite3, sys, time
path, seconds, tag = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + seconds
acked, errors, i = [], {}, 0
while time.monotonic() < deadline:
    con = None
    try:
        con = sqlite3.connect(path, timeout=5, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        for _ in range(20):
            i += 1
            row = f"{tag}-{i}"
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO t(src) VALUES (?)", (row,))
            con.execute("COMMIT")
            acked.append(row)
    except sqlite3.Error as e:
        errors[str(e)] = errors.get(str(e), 0) + 1
        time.sleep(0.02)
    finally:
        if con is not None:
            try:
                con.close()
            except sqlite3.Error as e:
                errors["close: " + str(e)] = errors.get("close: " + str(e), 0) + 1
print(json.dumps({"acked": acked, "errors": errors}), flush=True)
"""


def try_open(m, name: str, mode: str | None = None) -> str:
    args = [str(m / name)] + ([mode] if mode else [])
    out, err = m.py(TRY_OPEN, *args).communicate(timeout=60)
    assert not err, err
    return out.strip()


def header_says_wal(path) -> bool:
    """Whether the database header's file format bytes (18, 19) say WAL."""
    with open(path, "rb") as f:
        return f.read(20)[18:20] == b"\x02\x02"


def new_db(m, name: str, *others) -> None:
    con = sqlite3.connect(m / name)
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, src TEXT)")
    con.commit()
    con.close()
    for o in others:
        assert wait_for(lambda: (o / name).exists() and query(o / name, "SELECT count(*) FROM t") == [(0,)])


def start_holder(m, name: str, every: float = 0.05):
    p = m.py(HOLD_WAL, str(m / name), str(every), stdin=subprocess.PIPE)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def stop_holder(p) -> int:
    out, err = p.communicate("", timeout=60)
    assert p.returncode == 0, err
    return int(out.split()[-1])


@pytest.mark.parametrize("n_mounts", [2, 3])
@pytest.mark.timeout(120)
def test_a_second_mount_is_refused_while_one_has_the_database_in_wal_mode(mounts, n_mounts):
    a = mounts()
    others = [mounts(store=a.store) for _ in range(n_mounts - 1)]
    new_db(a, "w.db", *others)
    holder = start_holder(a, "w.db")
    try:
        for o in others:
            # a mount follows another's commits a few ms late: until it has followed the
            # switch, its readers see the rollback-mode file that was committed before it
            assert wait_for(lambda: header_says_wal(o / "w.db")), "the switch to WAL never reached the other mount"
            for mode in (None, "WAL", "DELETE"):  # rollback mode reads, switching to WAL or away
                got = try_open(o, "w.db", mode)
                assert got == "error unable to open database file", (mode, got)
            assert o.wait_log("event=wal_refused"), o.log_tail()
            line = next(ln for ln in o.log_text().splitlines() if "event=wal_refused" in ln)
            assert "path=/w.db" in line and "holder=" in line, line
            # the -wal's attributes are the owner's too (SQLite, as root, chowns a new -wal):
            # followed by the owner mid-transaction, such a change broke its WAL index
            with pytest.raises(OSError) as refused:
                os.chmod(o / "w.db-wal", 0o600)
            assert refused.value.errno == errno.EBUSY, refused.value
        time.sleep(0.3)
        assert try_open(a, "w.db").startswith("ok "), "the owner's other connections keep working"
    finally:
        written = stop_holder(holder)
    assert written > 0
    # the owner closed its connections: the WAL is free, the next mount takes it
    b = others[0]
    assert wait_for(lambda: try_open(b, "w.db", "WAL") == f"ok {written}", timeout=10), try_open(b, "w.db", "WAL")
    assert query(b / "w.db", "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("n_mounts", [2, 3])
@pytest.mark.timeout(180)
def test_wal_writers_on_several_mounts_lose_no_acknowledged_commit(mounts, n_mounts):
    """The issue's lost-commit scenario (two WAL writers, one per mount: 194 of 499
    acknowledged commits gone after a remount) fails loudly instead: a writer whose
    mount does not own the WAL gets an error, never a COMMIT that is later lost."""
    a = mounts()
    ms = [a] + [mounts(store=a.store) for _ in range(n_mounts - 1)]
    new_db(a, "s.db", *ms[1:])
    procs = [m.py(WAL_WRITER, str(m / "s.db"), "6", f"m{i}") for i, m in enumerate(ms)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    acked = [row for r in results for row in r["acked"]]
    errors = {msg: n for r in results for msg, n in r["errors"].items()}
    assert acked, errors
    assert len(set(acked)) == len(acked)
    for m in ms:
        m.stop()
    fresh = mounts.remount(a)
    rows = {src for (src,) in query(fresh / "s.db", "SELECT src FROM t")}
    missing = [row for row in acked if row not in rows]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged commits lost, e.g. {missing[:5]}; errors {errors}"
    assert rows <= set(acked), "a row whose COMMIT failed is in the database"
    assert query(fresh / "s.db", "PRAGMA integrity_check") == [("ok",)]
    print(f"acknowledged per mount {[len(r['acked']) for r in results]}, errors {errors}")


WRITE_AND_HOLD = r"""
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
for i in range(int(sys.argv[2])):
    con.execute("INSERT INTO t(src) VALUES ('a')")
print("done", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_a_killed_wal_owner_frees_the_database_once_its_lease_expires(mounts):
    lease = 2.0
    a = mounts(extra_args=("--lease-seconds", str(lease)))
    b = mounts(store=a.store, extra_args=("--lease-seconds", str(lease)))
    new_db(a, "k.db", b)
    holder = a.py(WRITE_AND_HOLD, str(a / "k.db"), "50")
    assert holder.stdout.readline().strip() == "done", holder.stderr.read()
    assert try_open(b, "k.db") == "error unable to open database file"
    a.kill9()
    killed = time.monotonic()
    holder.kill()
    # every COMMIT that returned (synchronous=FULL: each fsynced its -wal) is there
    assert wait_for(lambda: try_open(b, "k.db", "WAL") == "ok 50", timeout=lease + 10), try_open(b, "k.db", "WAL")
    print(f"WAL free {time.monotonic() - killed:.2f} s after the owner's kill -9 (lease {lease} s)")
    assert query(b / "k.db", "PRAGMA integrity_check") == [("ok",)]
    assert b.log_text().count("event=wal_owned") >= 1


#: a WAL connection on argv[1] inserting a row every argv[2] seconds until stdin closes;
#: on an error it reconnects, as an app would. Prints "ready" after 5 rows, then at the
#: end JSON {"acked": [rows whose COMMIT returned], "errors": {message: count}}
KEEP_WRITING = r"""
import json, sqlite3, sys, threading, time
path, every = sys.argv[1], float(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
acked, errors, con, i = [], {}, None, 0
while not stop.wait(every):
    try:
        if con is None:
            con = sqlite3.connect(path, timeout=5, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
        i += 1
        con.execute("INSERT INTO t(src) VALUES (?)", (f"a-{i}",))
        acked.append(f"a-{i}")
        if len(acked) == 5:
            print("ready", flush=True)
    except sqlite3.Error as e:
        errors[str(e)] = errors.get(str(e), 0) + 1
        try:
            con.close()
        except Exception:
            pass
        con = None
print(json.dumps({"acked": acked, "errors": errors}), flush=True)
"""

#: connect to argv[1] in WAL mode, commit argv[2] single-row transactions tagged argv[3], close
WRITE_ROWS = r"""
import sqlite3, sys
try:
    con = sqlite3.connect(sys.argv[1], timeout=2, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    for i in range(int(sys.argv[2])):
        con.execute("INSERT INTO t(src) VALUES (?)", (f"{sys.argv[3]}-{i}",))
    con.close()
    print("ok")
except sqlite3.Error as e:
    print("error", e)
"""


@pytest.mark.timeout(120)
def test_a_wal_owner_frozen_past_its_lease_commits_nothing_when_it_resumes(mounts):
    """The owner's daemon stops (SIGSTOP) past its lease while its app writes; another
    mount takes the WAL, commits, and closes; the owner resumes with its WAL index of
    files the other mount changed. Its app's next commits fail (the index is poisoned
    until it reconnects), and every acknowledged commit of both is there afterwards."""
    lease = 2.0
    a = mounts(extra_args=("--lease-seconds", str(lease)))
    b = mounts(store=a.store, extra_args=("--lease-seconds", str(lease)))
    new_db(a, "f.db", b)
    writer = a.py(KEEP_WRITING, str(a / "f.db"), "0.05", stdin=subprocess.PIPE)
    assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    os.kill(a.pid, signal.SIGSTOP)
    try:
        time.sleep(lease + 0.5)
        assert wait_for(lambda: b.py(WRITE_ROWS, str(b / "f.db"), "30", "b").communicate(timeout=60)[0].strip()
                        == "ok", timeout=lease + 10), b.log_tail()
    finally:
        os.kill(a.pid, signal.SIGCONT)
    time.sleep(1.5)  # the owner's app goes on writing: refused, then on a new connection
    out, err = writer.communicate("", timeout=60)
    assert writer.returncode == 0, err
    result = json.loads(out)
    acked = result["acked"] + [f"b-{i}" for i in range(30)]
    for m in (a, b):
        m.stop()
    fresh = mounts.remount(b)
    rows = [src for (src,) in query(fresh / "f.db", "SELECT src FROM t")]
    assert query(fresh / "f.db", "PRAGMA integrity_check") == [("ok",)]
    missing = [row for row in acked if row not in set(rows)]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged commits lost, e.g. {missing[:5]}; {result}"
    assert len(rows) == len(set(rows)) and set(rows) <= set(acked), "a row whose COMMIT failed is in the database"
    assert result["errors"], "the resumed owner's app got no error: its stale WAL index was not refused"
    assert "event=wal_poisoned" in a.log_text(), a.log_tail()
    print(f"acknowledged {len(acked)}, the resumed owner's errors {result['errors']}")


#: a WAL connection with locking_mode=EXCLUSIVE (its WAL index in its heap: it never
#: opens -shm) on argv[1]: 20 rows, "ready", then at a line on stdin 20 more; prints "acked N"
EXCLUSIVE_WAL = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA locking_mode=EXCLUSIVE")
assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
for i in range(20):
    con.execute("INSERT INTO t(src) VALUES (?)", (f"a-{i}",))
print("ready", flush=True)
sys.stdin.readline()
for i in range(20, 40):
    con.execute("INSERT INTO t(src) VALUES (?)", (f"a-{i}",))
con.close()
print("acked 40", flush=True)
"""


@pytest.mark.timeout(120)
def test_an_exclusive_mode_wal_connection_owns_the_database_too(mounts):
    """With locking_mode=EXCLUSIVE SQLite keeps its WAL index in the process's heap and
    opens -wal only: another mount taking the WAL meanwhile would write frames that
    index never sees (its later commits were acknowledged and lost)."""
    a = mounts()
    b = mounts(store=a.store)
    new_db(a, "x.db", b)
    p = a.py(EXCLUSIVE_WAL, str(a / "x.db"), stdin=subprocess.PIPE)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    assert b.py(WRITE_ROWS, str(b / "x.db"), "10", "b").communicate(timeout=60)[0].strip() == \
        "error unable to open database file"
    assert "op=open_wal" in b.log_text(), b.log_tail()
    out, err = p.communicate("go\n", timeout=60)
    assert out.split()[-2:] == ["acked", "40"], err
    for m in (a, b):
        m.stop()
    fresh = mounts.remount(b)
    assert query(fresh / "x.db", "PRAGMA integrity_check") == [("ok",)]
    assert sorted(src for (src,) in query(fresh / "x.db", "SELECT src FROM t")) == sorted(f"a-{i}" for i in range(40))
