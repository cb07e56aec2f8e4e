"""`fusesqlite status` (docs/operating.md)."""
from __future__ import annotations

import json
import sqlite3

import pytest
from helpers import run_cli
from test_many_mounts import wait_for


def _status(m, *args) -> dict:
    r = run_cli("status", *m.where, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.embedded
def test_status_shows_live_mounts_leases_and_pins_and_drops_a_killed_mount(mounts):
    a = mounts()
    ro = mounts(store=a.store, volume=a.volume, extra_args=("--read-only",))
    con = sqlite3.connect(a / "app.db", isolation_level=None)
    con.execute("CREATE TABLE t(x)")
    con.execute("INSERT INTO t VALUES (1)")
    assert run_cli("pin", "before", *a.where).returncode == 0
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t VALUES (2)")  # its journal exists: the mount holds the lease
    try:
        st = _status(a)
        (vol,) = st["volumes"]
        assert st["bytes_on_disk"] > 0 and vol["volume"] == (a.volume or "default")
        kinds = {m["mountpoint"]: m["kind"] for m in vol["mounts"]}
        assert kinds == {str(a.mountpoint): "read-write", str(ro.mountpoint): "read-only"}, vol["mounts"]
        assert all(m["pid"] in (a.pid, ro.pid) and m["last_seen_seconds_ago"] < 5 for m in vol["mounts"])
        # held by the writing mount: busy, or idle (kept between its transactions; docs/many-mounts.md)
        assert [(lease["path"], lease["holder"].split(":")[1]) for lease in vol["leases"]] == [
            ("/app.db", str(a.pid))], vol["leases"]
        assert vol["leases"][0]["expires_in_seconds"] > 0
        assert list(vol["pins"]) == ["before"] and vol["files"] == 1 and vol["live_bytes"] > 0
        assert vol["head"] and vol["versions"] >= 2 and vol["leftovers"] == {
            "expired_registrations": 0, "abandoned_stagings": 0}
    finally:
        con.execute("ROLLBACK")
        con.close()
    human = run_cli("status", *a.where)
    assert human.returncode == 0 and f"mount {ro.mountpoint}" not in human.stdout  # host:pid, then the path
    assert str(ro.mountpoint) in human.stdout and "pins: before=" in human.stdout, human.stdout
    ro.kill9()
    assert wait_for(lambda: [m["mountpoint"] for m in _status(a)["volumes"][0]["mounts"]] == [str(a.mountpoint)])
    assert _status(a)["volumes"][0]["leftovers"]["expired_registrations"] == 1
    assert run_cli("gc", *a.where).returncode == 0  # removes what the killed mount left
    assert wait_for(lambda: _status(a)["volumes"][0]["leftovers"]["expired_registrations"] == 0)


def test_status_errors_are_one_line(tmp_path):
    r = run_cli("status", "--store", tmp_path / "none")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no store at" in r.stderr, r.stderr
    (tmp_path / "store").mkdir()
    r = run_cli("status", "--store", tmp_path / "store", "--volume", "nope")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "has no volume 'nope'" in r.stderr, r.stderr
