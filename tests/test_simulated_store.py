"""The simulated FoundationDB cluster (``--simulate``, store/simulated.py), and the
product's store writes under its faults: a commit applied and then reported as
"result unknown" is found on retry, never written twice nor reported as failed."""
from __future__ import annotations

import logging
import time

import pytest
from helpers import ONE_CPU, run_cli
from test_many_mounts import INCREMENT, new_counter, query, wait_for

from fusesqlite.inodes import ROOT_INO, Inode
from fusesqlite.keyspace import pack, unpack
from fusesqlite.pages import decode_block, encode_block
from fusesqlite.store import (
    CommitUnknownResult,
    ConflictError,
    EmbeddedStore,
    RangeRead,
    SimulatedStore,
    SimulateSpec,
    SimulateSpecError,
    open_store,
    parse_simulate,
)
from fusesqlite.volume import ChangeSet, DataCommit, Volume

FILE = Inode(mode=0o100644, uid=0, gid=0, nlink=1)


# -- the spec -----------------------------------------------------------------------------


def test_a_spec_sets_what_it_names_and_leaves_the_rest_as_the_inner_store():
    assert parse_simulate("latency_ms=1,commit_ms=4") == SimulateSpec(latency_ms=1, commit_ms=4)
    assert parse_simulate("unknown_result=0.1, conflict=0.05,seed=7") == SimulateSpec(
        unknown_result=0.1, conflict=0.05, seed=7
    )


@pytest.mark.parametrize(
    "spec, says",
    [
        ("latency=1", "unknown setting 'latency'"),
        ("latency_ms=fast", "latency_ms needs a number"),
        ("commit_ms=-4", "commit_ms=-4 is not a number of milliseconds"),
        ("unknown_result=1", "unknown_result=1 is not a fraction in [0, 1)"),
        ("conflict=1.5", "conflict=1.5 is not a fraction in [0, 1)"),
        ("unknown_result=0.5,conflict=0.5", "must be under 1"),
        ("unknown_lost=0.4,conflict=0.3,unknown_result=0.3", "must be under 1"),
        ("seed=0.5", "seed needs a whole number"),
    ],
)
def test_a_bad_spec_is_one_line_that_says_what_is_allowed(spec, says):
    with pytest.raises(SimulateSpecError) as e:
        parse_simulate(spec)
    assert says in str(e.value) and "latency_ms=MS,commit_ms=MS" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["mount", "gc", "upgrade", "log"])
def test_every_command_that_opens_a_store_refuses_a_bad_spec_in_one_line(tmp_path, command):
    args = [command, *([str(tmp_path)] if command == "mount" else []), "--store", tmp_path / "store",
            "--simulate", "unknown_result=2"]
    r = run_cli(*args)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--simulate" in lines[0] and "unknown_result=2 is not a fraction" in lines[0], r.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was opened


def test_gc_and_upgrade_run_behind_a_simulated_cluster(tmp_path):
    store = tmp_path / "store"
    Volume(open_store(str(store)), "default").open()
    for command in ("gc", "upgrade"):
        r = run_cli(command, "--store", store, "--simulate", "latency_ms=1,commit_ms=1,unknown_result=0.5,seed=1")
        assert r.returncode == 0, r.stderr
        assert ("event=store_simulated latency_ms=1 commit_ms=1 unknown_result=0.5 conflict=0 unknown_lost=0 "
                "seed=1") in r.stderr


# -- the simulated cluster ----------------------------------------------------------------


def _simulated(tmp_path, **settings) -> SimulatedStore:
    return SimulatedStore(EmbeddedStore(tmp_path / "store"), SimulateSpec(**settings))


def test_reads_and_commits_wait_their_round_trips(tmp_path):
    store = _simulated(tmp_path, latency_ms=20, commit_ms=50)
    try:
        start = time.monotonic()
        store.transact(lambda tr: (tr.get(b"a"), tr.snapshot.get_range(b"a", b"b")))
        read_only = time.monotonic() - start
        start = time.monotonic()
        store.transact(lambda tr: (tr.get(b"a"), tr.set(b"a", b"1")))
        written = time.monotonic() - start
    finally:
        store.close()
    assert 0.040 <= read_only < 0.090, read_only  # two reads, no commit: nothing written
    assert 0.070 <= written < 0.160, written  # one read and the commit


def test_reads_asked_together_wait_one_round_trip(tmp_path):
    """``get_ranges`` is FoundationDB's futures issued together: five reads, one round trip."""
    store = _simulated(tmp_path, latency_ms=40)
    reads = [RangeRead.key(b"k%d" % i) for i in range(5)]
    try:
        store.transact(lambda tr: [tr.set(b"k%d" % i, b"v") for i in range(5)])
        start = time.monotonic()
        got = store.transact(lambda tr: tr.get_ranges(reads))
        together = time.monotonic() - start
    finally:
        store.close()
    assert got == [[(b"k%d" % i, b"v")] for i in range(5)]
    assert 0.040 <= together < 0.160, together  # one by one: 0.200


def test_faults_are_drawn_from_the_seed_and_retried_like_on_error(tmp_path):
    """A non-idempotent function (an increment) shows each unknown result: it was
    applied, then run again; a refused commit was not applied."""
    counts = []
    for run in range(2):
        store = _simulated(tmp_path / str(run), unknown_result=0.3, conflict=0.2, seed=11)
        attempts = 0

        def bump(tr):
            nonlocal attempts
            attempts += 1
            tr.set(b"n", b"%d" % (int(tr.get(b"n") or 0) + 1))

        try:
            for _ in range(40):
                store.transact(bump)
            counts.append((attempts, int(store.transact(lambda tr: tr.get(b"n")))))
        finally:
            store.close()
    (attempts, applied), again = counts
    assert again == (attempts, applied)  # the same seed, the same faults
    assert applied > 40 and attempts > applied  # some applied twice (unknown), some refused


def test_a_read_only_transaction_is_never_refused_nor_unknown(tmp_path):
    store = _simulated(tmp_path, unknown_result=0.45, conflict=0.45, seed=3)
    try:
        runs = 0

        def read(tr):
            nonlocal runs
            runs += 1
            return tr.get(b"x")

        for _ in range(30):
            store.transact(read)
        assert runs == 30
    finally:
        store.close()


def test_the_simulated_cluster_offers_no_commit_on_the_event_loop(tmp_path):
    store = _simulated(tmp_path)
    try:
        assert not hasattr(store, "transact_nowait")  # mount.py commits on worker threads then
    finally:
        store.close()


def test_given_up_after_an_unknown_result_the_error_says_unknown(tmp_path, monkeypatch):
    import fusesqlite.store.simulated as simulated

    monkeypatch.setattr(simulated, "RETRY_LIMIT", 4)
    store = _simulated(tmp_path, unknown_result=0.5, conflict=0.49, seed=5)
    try:
        errors = []
        for _ in range(200):
            try:
                store.transact(lambda tr: tr.set(b"k", b"v"))
            except (ConflictError, CommitUnknownResult) as e:
                errors.append(type(e))
        # four attempts each refused or unknown: once any was unknown, the error is "unknown"
        assert CommitUnknownResult in errors
        assert ConflictError in errors  # four refusals in a row: nothing was applied
    finally:
        store.close()


def test_a_mount_behind_a_simulated_cluster_commits_on_worker_threads(mounts):
    """On one CPU an embedded store's small commits run on the event loop
    (transact_nowait); a cluster's commit is a round trip, so they stay on threads."""
    m = mounts(extra_args=("--simulate", "latency_ms=1"), cpus=ONE_CPU)
    (m / "x").write_bytes(b"data")
    assert m.wait_log("event=commit_path inline=no cpus=1"), m.log_tail()
    assert "event=store_simulated latency_ms=1 commit_ms=0" in m.log_text()


# -- the volume's writes under "result unknown" -------------------------------------------


def _head(vol: Volume) -> int:
    return vol.head()


def test_every_volume_write_lands_exactly_once_when_results_are_unknown(tmp_path, caplog):
    """Half the commits are applied and then reported unknown: creates, renames,
    unlinks, data commits, stagings and leases each succeed once, each writes one
    log entry (stagings none), and no staging is left behind."""
    caplog.set_level(logging.INFO, logger="fusesqlite.volume")
    store = _simulated(tmp_path, unknown_result=0.5, seed=29)
    vol = Volume(store, "default", author="mount-a")
    try:
        vol.open()
        start = _head(vol)
        writes = 0
        inos = iter(vol.allocate_inodes(64))
        names: dict[bytes, int] = {}
        for i in range(12):  # creates
            ino, name = next(inos), b"f%d" % i
            vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, name): ino},
                                 expect={(ROOT_INO, name): None}))
            names[name] = ino
            writes += 1
        for i in range(0, 12, 3):  # renames
            old, new = b"f%d" % i, b"r%d" % i
            ino = names.pop(old)
            vol.commit(ChangeSet(dirents={(ROOT_INO, old): None, (ROOT_INO, new): ino},
                                 expect={(ROOT_INO, old): ino, (ROOT_INO, new): None}))
            names[new] = ino
            writes += 1
        for name in (b"f1", b"f2", b"r3"):  # unlinks
            ino = names.pop(name)
            vol.commit(ChangeSet(inodes={ino: None}, dirents={(ROOT_INO, name): None},
                                 expect={(ROOT_INO, name): ino}))
            writes += 1
        data_ino = names[b"f4"]
        for n in range(6):  # data commits, each based on the last
            rec = vol.read_inode(data_ino, vol.head())
            block = bytes([n]) * vol.block_size
            result = vol.commit(
                ChangeSet(inodes={data_ino: rec.with_(size=vol.block_size, hwm=1)},
                          blocks={(data_ino, 0): encode_block(block, data_ino, 0)}),
                {data_ino: DataCommit(based_on=rec.dver)},
            )
            assert result.records[data_ino].dver == result.version
            writes += 1
        for n in range(4):  # big transactions: a staging, its blocks, the commit that publishes them
            rec = vol.read_inode(data_ino, vol.head())
            staging = vol.begin_staging(data_ino, "mount-a")  # no log entry: a second one would stay in stagings()
            blocks = {b: encode_block(bytes([10 + n]) * vol.block_size, data_ino, b) for b in range(3)}
            vol.stage_blocks(data_ino, staging, blocks, "mount-a")
            result = vol.commit(
                ChangeSet(inodes={data_ino: rec.with_(size=3 * vol.block_size, hwm=3)}),
                {data_ino: DataCommit(based_on=rec.dver, staging=staging)},
            )
            writes += 1
            assert vol.stagings() == []
        leased = names[b"f5"]
        for _ in range(3):
            vol.acquire_lease(leased, 10.0, vol.read_inode(leased, vol.head()).dver)
            vol.want_lease(leased, 1.0)
            writes += 2
        lost, lost_wal = vol.renew_leases([leased], 10.0)
        assert lost == [] and lost_wal == []

        head = _head(vol)
        assert len(vol.log_range(start, head)) == writes  # one version per write: nothing written twice
        assert sorted(n for n, _, _ in vol.list_dir(ROOT_INO, head)) == sorted(names)
        rec = vol.read_inode(data_ino, head)
        assert rec.size == 3 * vol.block_size
        raw = vol.read_blocks(data_ino, range(3), rec.dver)
        assert [decode_block(raw[b], data_ino, b, vol.block_size) for b in range(3)] == [bytes([13]) * vol.block_size] * 3
        found = [r.getMessage() for r in caplog.records if "event=commit_found" in r.getMessage()]
        assert len(found) >= 5, "the simulated cluster should have reported several applied commits as unknown"
        assert any("what=staging" in line for line in found), "no staging's reservation was reported unknown"
    finally:
        store.close()


def test_a_call_whose_result_stays_unknown_is_resolved_by_the_next_call(tmp_path, monkeypatch, caplog):
    """The store gives up with the result unknown (its retries spent): the volume
    calls it again, which finds the commit that landed (a read-only attempt: never
    unknown itself)."""
    import fusesqlite.store.simulated as simulated

    store = _simulated(tmp_path, unknown_result=0.5, seed=4)
    vol = Volume(store, "default", author="mount-a")
    try:
        vol.open()
        inos = iter(vol.allocate_inodes(64))
        start = _head(vol)
        monkeypatch.setattr(simulated, "RETRY_LIMIT", 0)  # one attempt per call: every unknown result reaches the volume
        for i in range(20):
            ino = next(inos)
            vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, b"n%d" % i): ino},
                                 expect={(ROOT_INO, b"n%d" % i): None}))
        assert len(vol.log_range(start, _head(vol))) == 20  # each create once, none reported as failed
        assert "event=commit_unknown_resolving" in caplog.text
    finally:
        store.close()


def test_a_call_that_stays_unknown_past_the_resolving_time_fails_as_unknown(tmp_path, monkeypatch, caplog):
    """A cluster that answers "unknown" to every commit for RESOLVE_SECONDS, and applies
    none: the call gives up with CommitUnknownResult (the app sees an error), says so in
    the log, and nothing was written."""
    import fusesqlite.store.simulated as simulated
    import fusesqlite.volume as volume

    store = _simulated(tmp_path)
    vol = Volume(store, "default", author="mount-a")
    try:
        vol.open()
        ino = vol.allocate_inodes(1)[0]
        store.spec = SimulateSpec(unknown_lost=1.0)  # a cluster no --simulate allows: no attempt is applied
        monkeypatch.setattr(simulated, "RETRY_LIMIT", 0)
        monkeypatch.setattr(volume, "RESOLVE_SECONDS", 0.3)
        started = time.monotonic()
        with pytest.raises(CommitUnknownResult):
            vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, b"x"): ino}))
        assert time.monotonic() - started >= 0.3
        assert "event=commit_unknown_resolving" in caplog.text and "event=commit_unknown_given_up" in caplog.text
        store.spec = SimulateSpec()
        assert vol.lookup(ROOT_INO, b"x", vol.head()) is None
    finally:
        store.close()


def _calls(store, vol) -> list[tuple[bytes, tuple]]:
    return [(k, unpack(v)) for k, v in store.transact(lambda tr: tr.get_range(*vol.ks.children("call")))]


def test_a_call_key_holds_its_version_until_the_next_call_clears_it(tmp_path):
    """Each call that writes a version writes its call key (what a retry reads), and the
    next call of the same Volume clears it: one key per mount stays, not one per commit."""
    store = EmbeddedStore(tmp_path / "store")
    vol = Volume(store, "default", author="mount-a")
    try:
        vol.open()
        inos = iter(vol.allocate_inodes(8))
        versions = []
        for i in range(3):
            ino = next(inos)
            versions.append(vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, b"x%d" % i): ino})).version)
            calls = _calls(store, vol)
            assert len(calls) == 1 and calls[0][1][2] == versions[-1], calls  # (time, attempt, version)
            assert vol.ks.parts(calls[0][0])[1] == "mount-a"
        assert vol.clear_calls(time.time() - 3600) == 0  # young: a retry might still read it
        assert vol.clear_calls(time.time() + 1) == 1
        assert _calls(store, vol) == []
    finally:
        store.close()


def test_gc_removes_old_call_keys_of_a_mount_that_died(tmp_path):
    store_dir = tmp_path / "store"
    store = EmbeddedStore(store_dir)
    vol = Volume(store, "default", author="mount-dead")
    vol.open()
    ino = vol.allocate_inodes(1)[0]
    vol.commit(ChangeSet(inodes={ino: FILE}, dirents={(ROOT_INO, b"x"): ino}))
    key = _calls(store, vol)[0][0]
    store.transact(lambda tr: tr.set(key, pack((time.time() - 7200, 0, 5))))  # as written two hours ago
    store.close()
    r = run_cli("gc", "--store", str(store_dir))
    assert r.returncode == 0 and "1 old call key(s)" in r.stdout, r.stdout + r.stderr
    store = EmbeddedStore(store_dir)
    try:
        assert _calls(store, vol) == []
    finally:
        store.close()


# -- end to end: two mounts behind one simulated cluster ----------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("spec, per_process", [
    ("unknown_result=0.1,conflict=0.05", 15),
    pytest.param("latency_ms=1,commit_ms=4,unknown_result=0.1,conflict=0.05", 60, marks=pytest.mark.slow),
])
def test_a_counter_incremented_on_two_mounts_with_unknown_results_and_conflicts_is_exact(mounts, spec, per_process):
    """The issue's acceptance: processes on two mounts increment one counter (rollback
    journal, busy timeout, retry on error); commits are refused (5%) and applied but
    reported unknown (10%). An app that saw an error for a commit that landed would
    retry it, and the counter would end above the count."""
    simulate = ("--simulate", spec)
    first = mounts(extra_args=simulate)
    second = mounts(store=first.store, extra_args=simulate)
    new_counter(first, "counter.db", second)
    procs = []
    for m in (first, second):
        for _ in range(2):
            procs.append(m.py(INCREMENT, str(m / "counter.db"), str(per_process)))
    for p in procs:
        out, err = p.communicate(timeout=250)
        assert p.returncode == 0, err
        assert int(out.split()[0]) == per_process
    expected = per_process * len(procs)
    for m in (first, second):
        assert wait_for(lambda: query(m / "counter.db", "SELECT v FROM counter") == [(expected,)]), \
            query(m / "counter.db", "SELECT v FROM counter")
        assert query(m / "counter.db", "PRAGMA integrity_check") == [("ok",)]
    logs = first.log_text() + second.log_text()
    assert "event=store_simulated" in first.log_text()
    assert "event=commit_found" in logs  # unknown results did reach the volume's commits


@pytest.mark.timeout(180)
def test_a_big_transaction_commits_once_and_leaves_no_staging_when_results_are_unknown(mounts):
    """A transaction beyond the memory budget is staged (begin_staging, stage_blocks)
    and published by a small commit; with half the commits reported unknown, it
    commits once, whole, and its staging is gone (a second reservation would stay
    behind and block the file)."""
    from test_big_transactions import SMALL, check, count_keys, insert_rows, make_db

    m = mounts(extra_args=(*SMALL, "--simulate", "unknown_result=0.5"), debug=True)
    db = m / "big.db"
    make_db(db)
    con = insert_rows(db, 8000)  # ~8 MB in one transaction: staged in 1 MiB chunks
    con.close()
    assert check(db) == (8100, "ok")
    for i in range(8):  # the file system still commits (and more calls meet unknown results)
        make_db(m / f"after{i}.db")
    m.stop()
    log = m.log_text()
    assert log.count("event=staged ") >= 4, "the transaction should have been staged in chunks"
    assert "event=commit_found" in log
    assert count_keys(m.store, m.volume, "staging") == 0
    assert count_keys(m.store, m.volume, "stg") == 0
    again = mounts.remount(m)
    assert check(again / "big.db") == (8100, "ok")
