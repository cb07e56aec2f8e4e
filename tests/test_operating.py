"""Operating a mount: Prometheus metrics, JSON logs, the systemd unit (docs/operating.md)."""
from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess

import pytest
from helpers import REPO, child_env, free_port, is_mounted, run_cli, scrape_metrics
from test_many_mounts import wait_for

UNIT = REPO / "scripts" / "fusesqlite@.service"


def test_metrics_count_commits_and_parse_as_prometheus_text(mounts):
    port = free_port()
    m = mounts(extra_args=("--metrics", str(port)))
    assert m.wait_log(f"event=metrics_listening url=http://127.0.0.1:{port}/metrics")
    con = sqlite3.connect(m / "app.db", isolation_level=None)
    con.execute("CREATE TABLE t(x)")
    before = scrape_metrics(port)
    for i in range(50):
        con.execute("INSERT INTO t VALUES (?)", (i,))
    big = os.urandom(1 << 20)
    (m / "blob").write_bytes(big)  # a plain file: written, committed at its close
    assert (m / "blob").read_bytes() == big
    con.close()
    after = scrape_metrics(port)
    assert all(k.startswith(("fusesqlite_", "process_", "python_")) for k in after), sorted(after)
    assert after['fusesqlite_commits_total{outcome=ok}'] >= before['fusesqlite_commits_total{outcome=ok}'] + 50
    assert after["fusesqlite_commit_seconds_count"] >= before["fusesqlite_commit_seconds_count"] + 50
    assert after["fusesqlite_commit_seconds_sum"] > 0
    assert after['fusesqlite_commits_total{outcome=error}'] == 0
    assert after["fusesqlite_written_bytes_total"] - before["fusesqlite_written_bytes_total"] >= len(big)
    assert after["fusesqlite_committed_bytes_total"] - before["fusesqlite_committed_bytes_total"] >= len(big)
    assert after["fusesqlite_store_round_trip_seconds_count{kind=commit}"] >= 50
    assert after["fusesqlite_store_round_trip_seconds_count{kind=read}"] > 0
    assert after["fusesqlite_store_round_trip_seconds_sum{kind=commit}"] > 0
    assert after["fusesqlite_store_transaction_seconds_count"] >= 50
    assert after["fusesqlite_fuse_requests_total{operation=create}"] >= 50  # a journal per transaction
    assert after["fusesqlite_memory_budget_bytes"] == 256 << 20
    assert 0 < after["fusesqlite_memory_resident_bytes"] < 1 << 30
    assert after["fusesqlite_lag_seconds"] == 0
    for name in ("fusesqlite_block_cache_hits_total", "fusesqlite_block_cache_misses_total",
                 "fusesqlite_read_ahead_bytes_total", "fusesqlite_staged_bytes_total",
                 "fusesqlite_uncommitted_bytes", "fusesqlite_leases_held", "process_resident_memory_bytes"):
        assert name in after, (name, sorted(after))
    m.stop()
    assert m.wait_log("event=unmounted") and "commits=" in m.log_text()


def test_metrics_show_leases_staging_and_cache_of_big_transactions(mounts):
    port = free_port()
    m = mounts(extra_args=("--metrics", f"127.0.0.1:{port}", "--memory-mb", "64"))
    con = sqlite3.connect(m / "big.db", isolation_level=None)
    con.execute("CREATE TABLE t(x)")
    con.execute("BEGIN")
    con.execute("WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 40000) "
                "INSERT INTO t SELECT randomblob(1000) FROM c")
    mid = scrape_metrics(port)
    assert mid["fusesqlite_leases_held"] >= 1  # its journal exists: the write lease is this mount's
    con.execute("COMMIT")
    after = scrape_metrics(port)
    assert after["fusesqlite_staged_bytes_total"] > 0  # 40 MB against an overlay of a few MiB
    assert con.execute("SELECT count(*) FROM t").fetchone() == (40000,)
    con.close()
    assert after['fusesqlite_commits_total{outcome=ok}'] >= 2


def test_a_bad_metrics_address_or_a_port_in_use_is_a_one_line_error(tmp_path):
    (tmp_path / "mnt").mkdir()
    for address, says in (("foo:9464", "is not an IP address"), ("70000", "from 1 to 65535"),
                          (":9464", "name the address")):
        r = run_cli("mount", tmp_path / "mnt", "--store", tmp_path / "store", "--metrics", address)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("mount", tmp_path / "mnt", "--store", tmp_path / "store", "--metrics", str(port), timeout=30)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "choose a free port" in r.stderr, r.stderr
    assert not is_mounted(tmp_path / "mnt")


def test_json_logs_are_one_object_per_line_with_the_event_fields(mounts):
    m = mounts(extra_args=("--log-format", "json"))
    con = sqlite3.connect(m / "app.db", isolation_level=None)
    con.execute("CREATE TABLE t(x)")
    con.close()
    m.stop()
    lines = m.log_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line: a JSON object
    events = {r["event"]: r for r in records if "event" in r}
    assert {"mounted", "unmounted"} <= set(events), [r.get("event") for r in records]
    assert events["mounted"]["mountpoint"] == str(m.mountpoint) and events["mounted"]["level"] == "INFO"
    assert events["unmounted"]["clean"] == "True" and int(events["unmounted"]["commits"]) >= 1
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return unit


def test_the_systemd_unit_verifies(tmp_path):
    """systemd's own check of the unit, as an instance (it needs the command installed: scripts/install.sh)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    instance = tmp_path / "fusesqlite@app.service"
    instance.write_text(UNIT.read_text())
    r = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    service = _unit()["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure" and service["KillMode"] == "mixed"


def test_the_systemd_units_command_mounts_reports_ready_and_unmounts_cleanly_on_stop(tmp_path):
    """The unit's ExecStart as systemd runs it (its environment file, $NOTIFY_SOCKET):
    READY=1 once the mount serves, STOPPING=1 and a clean unmount at SIGTERM."""
    service = _unit()["Service"]
    env = {"MOUNTPOINT": str(tmp_path / "mnt"), "FUSESQLITE_STORE": str(tmp_path / "store"), "OPTIONS": "--debug"}
    (tmp_path / "mnt").mkdir()
    argv = [a.replace("${MOUNTPOINT}", env["MOUNTPOINT"]).replace("%i", "app")
            for a in shlex.split(service["ExecStart"])]
    argv = [x for a in argv for x in (env["OPTIONS"].split() if a == "$OPTIONS" else [a])]
    assert argv[:2] == ["/usr/local/bin/fusesqlite", "mount"], argv
    assert os.access(argv[0], os.X_OK), f"{argv[0]} is missing: scripts/install.sh links it there"
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(30)
        log = open(tmp_path / "daemon.log", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=child_env({"NOTIFY_SOCKET": str(notify), "FUSESQLITE_STORE": env["FUSESQLITE_STORE"]}),
                                start_new_session=True)
        log.close()
        try:
            ready = sock.recv(4096).decode()
            assert ready.startswith("READY=1\n") and f"serving {tmp_path / 'mnt'}" in ready, ready
            assert is_mounted(tmp_path / "mnt")
            con = sqlite3.connect(tmp_path / "mnt" / "app.db", isolation_level=None)
            con.execute("CREATE TABLE t(x)")
            con.close()
            proc.send_signal(signal.SIGTERM)  # systemctl stop (KillMode=mixed: the main process first)
            assert sock.recv(4096) == b"STOPPING=1"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if is_mounted(tmp_path / "mnt"):
                subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False)
    assert wait_for(lambda: not is_mounted(tmp_path / "mnt"))
    r = run_cli("log", "--store", tmp_path / "store", "--volume", "app", "--json")
    assert r.returncode == 0 and any("/app.db" in v["files"] for v in json.loads(r.stdout)), r.stdout
    assert argv[argv.index("--volume") + 1] == "app"  # the unit's volume is its instance name (%i)
