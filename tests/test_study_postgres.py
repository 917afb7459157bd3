"""Reading studies against a real PostgreSQL server: identity, blinding, refusals, nothing lost.

The server is the session's (``fixtures_postgres``); each module gets its own database owned by
the ``coordinator`` role, with a study ``s1`` read by alice and bob (carol has a login but is not
one of its readers).
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import sqlalchemy as sa

from napari_mammo_sae.errors import (
    DatabaseAuthError,
    DatabaseUnavailableError,
    PermissionRefusedError,
    StudyError,
)
from napari_mammo_sae.labels import LabelStore
from napari_mammo_sae.labels.outbox import Outbox
from napari_mammo_sae.labels.schema import CONTENT_FIELDS
from napari_mammo_sae.labels.study import (
    StudyReader,
    choose_neurons,
    create_study,
    export_study,
    study_agreement,
)

SAE = "c0" * 32
PASSWORDS = {"alice": "alice-pw-4417", "bob": "bob-pw-9921", "carol": "carol-pw-5530"}
COORD_PW = "coord-pw"


@pytest.fixture(scope="module")
def study(postgres_server):
    """(server, database name): study s1 (neurons 0..11, readers alice and bob; alice never
    rates 10 and 11)."""
    name = postgres_server.new_database("studies", COORD_PW)
    with LabelStore(postgres_server.url("coordinator", name), password=COORD_PW) as coord:
        create_study(
            coord, "s1", sae_hash=SAE, concept="mass", neurons=choose_neurons(given=range(12)),
            readers=["alice", "bob"], seed=7, reader_passwords=PASSWORDS,
        )  # fmt: skip
        # carol can log in (a reader of another study) but is not a reader of s1
        create_study(
            coord, "other", sae_hash=SAE, concept="mass", neurons={99: "given"},
            readers=["carol"], reader_passwords=PASSWORDS,
        )  # fmt: skip
    return postgres_server, name


def reader_store(study, who):
    server, name = study
    return LabelStore(server.url(who, name), password=PASSWORDS[who])


def coordinator(study):
    server, name = study
    return LabelStore(server.url("coordinator", name), password=COORD_PW)


def test_a_reader_writes_only_under_their_own_name_and_never_changes_a_row(study):
    with reader_store(study, "alice") as alice:
        alice.add(SAE, 0, "clinical", "alice", study="s1")
        with pytest.raises(PermissionRefusedError, match="row-level security"):
            alice.add(SAE, 0, "spurious", "bob", study="s1")  # under a colleague's name
        for sql in ("UPDATE verdicts SET verdict = 'spurious'", "DELETE FROM verdicts"):
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                with alice.engine.begin() as conn:
                    conn.exec_driver_sql(sql)
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            with alice.engine.begin() as conn:  # nor the study design
                conn.exec_driver_sql("INSERT INTO study_readers VALUES ('s1', 'mallory')")
    with coordinator(study) as coord:
        rows = coord.verdicts(SAE, neuron=0, study="s1")
        assert [(v.rater, v.verdict) for v in rows] == [("alice", "clinical")]


def test_a_reader_sees_a_colleagues_verdict_only_after_giving_their_own(study):
    with reader_store(study, "alice") as alice, reader_store(study, "bob") as bob:
        alice.add(SAE, 1, "spurious", "alice", "looks like a skin fold", study="s1")
        assert bob.verdicts(SAE, neuron=1) == []  # blinded: not even the count
        with bob.engine.connect() as conn:  # and not through hand-written SQL either
            assert (
                conn.exec_driver_sql("SELECT count(*) FROM verdicts WHERE neuron = 1").scalar() == 0
            )
        bob.add(SAE, 1, "clinical", "bob", study="s1")
        assert {(v.rater, v.verdict) for v in bob.verdicts(SAE, neuron=1)} == {
            ("alice", "spurious"),
            ("bob", "clinical"),
        }
        assert [v.rater for v in alice.verdicts(SAE, neuron=2)] == []
    with coordinator(study) as coord:  # the coordinator reads everything
        assert {v.rater for v in coord.verdicts(SAE, neuron=1)} == {"alice", "bob"}


def test_unknown_study_and_a_reader_outside_the_study_get_clear_refusals(study, tmp_path):
    with reader_store(study, "carol") as carol:
        with pytest.raises(StudyError, match="'carol' is not one of the readers of study 's1'"):
            StudyReader(carol, "s1", Outbox(tmp_path / "carol.sqlite"))
        with pytest.raises(PermissionRefusedError):  # the database refuses it too
            carol.add(SAE, 3, "clinical", "carol", study="s1")
    with reader_store(study, "alice") as alice:
        with pytest.raises(StudyError, match="no study 'nope'"):
            StudyReader(alice, "nope", Outbox(tmp_path / "alice.sqlite"))
    with coordinator(study) as coord:
        assert coord.verdicts(SAE, rater="carol") == []


def test_a_wrong_password_says_so_and_never_shows_it(study, caplog, monkeypatch, tmp_path):
    server, name = study
    wrong = "Wr0ng-Secret-731"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("NAPARI_MAMMO_SAE_DB_PASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    logging.getLogger("sqlalchemy").setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(
                DatabaseAuthError, match="wrong password for database user 'alice'"
            ) as err:
                LabelStore(server.url("alice", name), password=wrong)
            asked = []
            with pytest.raises(DatabaseAuthError):  # the prompt is asked once, then it stops
                LabelStore(server.url("alice", name), prompt=lambda q: asked.append(q) or wrong)
    finally:
        logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    import traceback

    shown = "".join(traceback.format_exception(err.value)) + repr(err.value) + caplog.text
    assert wrong not in shown
    assert asked == [f"password for alice on alice@{server.host}:{server.port}/{name}"]
    # no password at all: the message says where one can come from
    with pytest.raises(DatabaseAuthError, match="PGPASSWORD"):
        LabelStore(server.url("alice", name))
    # the prompt, the environment and a pgpass file are the ways in
    with LabelStore(server.url("alice", name), prompt=lambda q: PASSWORDS["alice"]) as s:
        assert s.user == "alice"
    monkeypatch.setenv("NAPARI_MAMMO_SAE_DB_PASSWORD", PASSWORDS["alice"])
    LabelStore(server.url("alice", name)).close()
    monkeypatch.delenv("NAPARI_MAMMO_SAE_DB_PASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"{server.host}:{server.port}:{name}:alice:{PASSWORDS['alice']}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    LabelStore(server.url("alice", name)).close()


def test_a_dropped_connection_is_replaced_and_nothing_is_lost(study, tmp_path):
    server, name = study
    with reader_store(study, "bob") as bob:
        reader = StudyReader(bob, "s1", Outbox(tmp_path / "bob.sqlite"))
        assert reader.record(5, "unsure")[0] == "saved"
        server.sql(  # the network drops every connection bob has
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'bob'"
        )
        assert reader.record(6, "clinical")[0] == "saved"
    with coordinator(study) as coord:
        got = [(v.neuron, v.verdict) for v in coord.verdicts(SAE, rater="bob", study="s1")]
        assert (5, "unsure") in got and (6, "clinical") in got


def test_a_server_restart_queues_verdicts_and_sends_them_in_order_once(study, tmp_path):
    server, name = study
    outbox = Outbox(tmp_path / "alice.sqlite")
    with reader_store(study, "alice") as alice:
        reader = StudyReader(alice, "s1", outbox)
        queue = [n for n in reader.remaining() if n < 10]
        done_before, total = reader.progress()
        status, _ = reader.record(queue[0], "clinical")
        assert status == "saved"
        server.pg_ctl("stop")
        try:
            statuses = [
                reader.record(n, v)[0]
                for n, v in zip(queue[1:4], ("spurious", "unsure", "clinical"), strict=True)
            ]
            assert statuses == ["queued"] * 3
            assert "cannot reach the database server" in reader.last_error
            assert reader.waiting() == 3
            assert reader.progress() == (done_before + 4, total)  # queued verdicts count as done
            assert [n for n in reader.remaining() if n < 10][:1] == queue[4:5]
            with pytest.raises(DatabaseUnavailableError):  # a new login says why it cannot
                reader_store(study, "alice")
        finally:
            server.pg_ctl("start")
        result = reader.flush()
        assert result.left == 0 and len(result.sent) == 3
        # a verdict the server had but the outbox still held (killed between the two): sent again
        # on the next flush, stored once
        again = {**alice.verdicts(SAE, rater="alice", study="s1")[-1].__dict__}
        outbox.put(
            reader.target,
            {k: again[k] for k in (*CONTENT_FIELDS, "uid", "study")},
        )
        assert len(reader.flush().sent) == 1
    with coordinator(study) as coord:
        rows = coord.verdicts(SAE, rater="alice", study="s1")
        sent = [(v.neuron, v.verdict) for v in rows if v.neuron in queue[:4]]
        assert sent[-4:] == list(
            zip(queue[:4], ("clinical", "spurious", "unsure", "clinical"), strict=True)
        )
        assert len({v.uid for v in rows}) == len(rows)
        created = [v.created_utc for v in rows if v.neuron in queue[1:4]]
        assert created == sorted(created)  # in the order they were given


def test_a_single_reader_file_is_migrated_and_imported_into_a_study(study, tmp_path):
    from test_labels import make_v1_file

    old = tmp_path / "ann-workstation.sqlite"
    make_v1_file(old, [
        (SAE, 2, "", "mass", "clinical", "alice", "", "2026-11-20T09:00:00.000000Z"),
        (SAE, 2, "", "mass", "spurious", "alice", "second look", "2026-11-20T09:10:00.000000Z"),
        (SAE, 3, "", "mass", "unsure", "alice", "", "2026-11-20T09:11:00.000000Z"),
    ])  # fmt: skip
    with LabelStore(old) as store:  # migrated in place on first open
        assert store.verdict_of(SAE, 2, "alice") == "spurious"
        store.export_csv(tmp_path / "alice.csv")
    from napari_mammo_sae.cli import main

    server, name = study
    os.environ["NAPARI_MAMMO_SAE_DB_PASSWORD"] = COORD_PW
    try:
        url = server.url("coordinator", name)
        args = ["study", "import", "--db", url, "--study", "s1", str(tmp_path / "alice.csv")]
        assert main(args) == 0
        assert main(args) == 0  # again: nothing new
    finally:
        del os.environ["NAPARI_MAMMO_SAE_DB_PASSWORD"]
    with coordinator(study) as coord:
        imported = [
            v
            for v in coord.verdicts(SAE, rater="alice", study="s1")
            if v.created_utc < "2026-11-21"
        ]
        assert [(v.neuron, v.verdict) for v in imported] == [
            (2, "clinical"),
            (2, "spurious"),
            (3, "unsure"),
        ]
    with reader_store(study, "alice") as alice:
        reader = StudyReader(alice, "s1", Outbox(tmp_path / "a.sqlite"))
        assert {2, 3} <= reader.done()
        assert 2 not in reader.remaining() and 3 not in reader.remaining()


def test_the_coordinator_exports_agreement_and_consensus(study, tmp_path):
    with reader_store(study, "alice") as alice, reader_store(study, "bob") as bob:
        for n in (7, 8, 9):
            alice.add(SAE, n, "spurious", "alice", study="s1")
            bob.add(SAE, n, "spurious" if n != 9 else "clinical", "bob", study="s1")
        bob.add(SAE, 10, "clinical", "bob", study="s1")  # alice has not rated 10
        # a reader's export holds only what the database lets them see: colleagues' verdicts
        # only on neurons they rated themselves
        mine = export_study(alice, "s1", tmp_path / "alice-export", n_bootstrap=10)
        import csv

        with open(mine["verdicts"], newline="") as fh:
            seen = list(csv.DictReader(fh))
        own = {int(r["neuron"]) for r in seen if r["rater"] == "alice"}
        others = [r for r in seen if r["rater"] != "alice"]
        assert others and all(int(r["neuron"]) in own for r in others)
        with bob.engine.connect() as conn:
            bob_neurons = {
                n
                for (n,) in conn.exec_driver_sql("SELECT neuron FROM verdicts WHERE rater = 'bob'")
            }
        assert bob_neurons - own, "bob should have a verdict alice cannot see"
        assert not any(int(r["neuron"]) in bob_neurons - own for r in others)
    with coordinator(study) as coord:
        design, stats = study_agreement(coord, "s1", n_bootstrap=200)
        assert stats.consensus[7] == stats.consensus[8] == "spurious"
        assert stats.consensus[9] == "disputed"
        paths = export_study(coord, "s1", tmp_path / "export", n_bootstrap=200)
    report = paths["markdown"].read_text()
    assert (
        "Fleiss' kappa" in report and "Krippendorff's alpha" in report and "Cohen's kappa" in report
    )
    assert "Spurious by consensus: " in report and "7, 8" in report
    assert "<table" in paths["html"].read_text()
    consensus = paths["consensus"].read_text().splitlines()
    assert consensus[0] == "neuron,source,consensus,votes,ratings,alice,bob"
    assert "9,given,disputed,1,2,spurious,clinical" in consensus


KILL_READER = textwrap.dedent(
    """
    import os, sys
    from napari_mammo_sae.labels import LabelStore
    from napari_mammo_sae.labels.outbox import Outbox
    from napari_mammo_sae.labels.study import StudyReader
    url, who, outbox = sys.argv[1:4]
    store = LabelStore(url)
    reader = StudyReader(store, "load", Outbox(outbox))
    print("START", len(reader.remaining()), flush=True)
    for neuron in reader.remaining():
        status, uid = reader.record(neuron, ("clinical", "spurious", "unsure")[neuron % 3])
        if status == "saved":
            print("SAVED", uid, flush=True)
    print("DONE", flush=True)
    """
)


def test_eight_readers_killed_at_random_lose_nothing_and_store_nothing_twice(study, tmp_path):
    server, name = study
    readers = [f"load{i}" for i in range(8)]
    passwords = {r: f"pw-{r}" for r in readers}
    with coordinator(study) as coord:
        create_study(
            coord, "load", sae_hash=SAE, concept="mass", neurons=choose_neurons(given=range(200)),
            readers=readers, reader_passwords=passwords,
        )  # fmt: skip
    rng = random.Random(15)

    def start(r):
        env = dict(os.environ, NAPARI_MAMMO_SAE_DB_PASSWORD=passwords[r], OMP_NUM_THREADS="1")
        return subprocess.Popen(
            [sys.executable, "-c", KILL_READER, server.url(r, name), r, str(tmp_path / f"{r}.sqlite")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    saved: dict[str, set[str]] = {r: set() for r in readers}
    procs = {r: start(r) for r in readers}
    victims = rng.sample(readers, 4)
    first_runs: dict[str, tuple[int, list[str]]] = {}

    def kill_mid_run(r, after):  # kill -9 once the reader has shown "saved" `after` times
        lines, n = [], 0
        for line in procs[r].stdout:
            lines.append(line)
            n += line.startswith("SAVED")
            if n >= after:
                procs[r].kill()
                break
        procs[r].wait(timeout=60)
        lines += procs[r].stdout.read().splitlines(keepends=True)
        first_runs[r] = (procs[r].returncode, lines)

    import threading

    killers = [
        threading.Thread(target=kill_mid_run, args=(r, rng.randint(10, 150))) for r in victims
    ]
    for t in killers:
        t.start()
    deadline = time.monotonic() + 120
    for t in killers:
        t.join(max(1, deadline - time.monotonic()))
    for r in readers:
        if r in victims:
            code, lines = first_runs[r]
            assert code == -9 and not any(line.startswith("DONE") for line in lines)  # mid-run
            saved[r] |= {line.split()[1] for line in lines if line.startswith("SAVED")}
            again = start(r)  # the reader starts the viewer again: same outbox, same queue
            out, err = again.communicate(timeout=max(1, deadline - time.monotonic()))
            assert again.returncode == 0, err[-2000:]
        else:
            out, err = procs[r].communicate(timeout=max(1, deadline - time.monotonic()))
            assert procs[r].returncode == 0, err[-2000:]
        saved[r] |= {line.split()[1] for line in out.splitlines() if line.startswith("SAVED")}
        assert "DONE" in out
    with coordinator(study) as coord:
        rows = coord.verdicts(SAE, study="load")
    by_reader: dict[str, list] = {r: [] for r in readers}
    for v in rows:
        by_reader[v.rater].append(v)
    for r in readers:
        neurons = [v.neuron for v in by_reader[r]]
        assert sorted(neurons) == list(range(200)), r  # every verdict, none twice
        assert saved[r] <= {v.uid for v in by_reader[r]}  # every "saved" one is there
    assert len({v.uid for v in rows}) == len(rows) == 1600


def test_concurrent_first_use_on_the_server_creates_the_schema_once(study, tmp_path):
    server, _ = study
    name = server.new_database("fresh", COORD_PW)
    go = tmp_path / "go"
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from napari_mammo_sae.labels import LabelStore
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        LabelStore(sys.argv[1]).close()
        """
    )
    env = dict(os.environ, NAPARI_MAMMO_SAE_DB_PASSWORD=COORD_PW)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, server.url("coordinator", name)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    time.sleep(1.0)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    import psycopg

    with psycopg.connect(host=str(server.socket_dir), port=server.port, user="postgres",
                         dbname=name) as conn:  # fmt: skip
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        assert conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE relname = 'verdicts'"
        ).fetchone() == (True,)
