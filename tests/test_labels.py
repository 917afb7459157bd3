"""The verdict store: persistence, history, kill-safety, kappa on known cases, CSV round trip."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from napari_mammo_sae.errors import LabelDatabaseError, StoreError
from napari_mammo_sae.labels import LabelStore, cohen_kappa, fleiss_kappa

SAE = "5a" * 32  # an SAE sha256 (CSV imports check the key's form)


def test_verdicts_persist_and_keep_history(tmp_path):
    db = tmp_path / "labels.sqlite"
    with LabelStore(db) as store:
        store.add("sae1", 7, "clinical", "ann", "on the cluster")
        store.add("sae1", 7, "spurious", "ann", "changed my mind")
        store.add("sae1", 9, "unsure", "ann")
    with LabelStore(db) as store:  # a fresh connection: what the next viewer sees
        history = store.history("sae1", 7)
        assert [v.verdict for v in history] == ["clinical", "spurious"]
        assert store.verdict_of("sae1", 7, "ann") == "spurious"
        assert store.counts("sae1") == {"clinical": 0, "spurious": 1, "unsure": 1}
        assert store.spurious_neurons("sae1") == [7]
        assert store.history("other") == []


def test_bad_input_is_refused_and_nothing_is_written(tmp_path):
    with LabelStore(tmp_path / "l.sqlite") as store:
        with pytest.raises(StoreError, match="unknown verdict"):
            store.add("sae1", 1, "maybe", "ann")
        with pytest.raises(StoreError, match="rater"):
            store.add("sae1", 1, "clinical", "  ")
        assert store.history("sae1") == []


def test_a_killed_process_keeps_the_verdict_it_reported_saved(tmp_path):
    db = tmp_path / "labels.sqlite"
    code = textwrap.dedent(
        f"""
        import os, signal
        from napari_mammo_sae.labels import LabelStore
        store = LabelStore({str(db)!r})
        store.add("sae1", 3, "clinical", "bob")
        print("SAVED", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert "SAVED" in proc.stdout
    with LabelStore(db) as store:
        assert store.verdict_of("sae1", 3, "bob") == "clinical"


def test_two_connections_write_without_losing_rows(tmp_path):
    db = tmp_path / "labels.sqlite"
    a, b = LabelStore(db), LabelStore(db)
    for i in range(20):
        (a if i % 2 else b).add("s", i, "clinical", "ann" if i % 2 else "bob")
    assert len(LabelStore(db).history("s")) == 20
    a.close()
    b.close()


def test_cohen_kappa_on_a_known_case(tmp_path):
    # 10 neurons; raters agree on 8 (5 clinical, 3 spurious), disagree on 2:
    # p_o = 0.8; ann: 6 clinical / 4 spurious, bob: 6 / 4 -> p_e = 0.36 + 0.16 = 0.52
    # kappa = (0.8 - 0.52) / 0.48 = 0.58333
    ann = ["clinical"] * 5 + ["spurious"] * 3 + ["clinical", "spurious"]
    bob = ["clinical"] * 5 + ["spurious"] * 3 + ["spurious", "clinical"]
    with LabelStore(tmp_path / "l.sqlite") as store:
        for n, (x, y) in enumerate(zip(ann, bob, strict=True)):
            store.add("s", n, x, "ann")
            store.add("s", n, y, "bob")
        kappa, n = store.cohen_kappa("ann", "bob", "s")
    assert n == 10
    assert kappa == pytest.approx(0.58333, abs=1e-4)
    assert cohen_kappa(["a", "a"], ["a", "a"]) == 1.0


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) / the standard worked example: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=1e-3)


def test_fleiss_kappa_from_three_raters(tmp_path):
    with LabelStore(tmp_path / "l.sqlite") as store:
        for n in range(4):
            for rater in ("a", "b", "c"):
                store.add("s", n, "clinical" if n < 2 else "spurious", rater)
        kappa, n = store.fleiss_kappa("s")
    assert n == 4 and kappa == pytest.approx(1.0)


def test_agreement_with_box_agreement(tmp_path):
    with LabelStore(tmp_path / "l.sqlite") as store:
        store.add("s", 1, "clinical", "ann")
        store.add("s", 2, "spurious", "ann")
        store.add("s", 3, "clinical", "ann")
        out = store.box_agreement("s", {1: 0.6, 2: 0.0, 3: 0.1, 4: 0.9})
    assert out["n"] == 3
    assert out["table"] == {"clinical": {"on": 1, "off": 1}, "spurious": {"on": 0, "off": 1}}
    assert out["agreement"] == pytest.approx(2 / 3)


def test_csv_round_trip_is_idempotent(tmp_path):
    src = LabelStore(tmp_path / "a.sqlite")
    src.add(SAE, 1, "clinical", "ann", "note, with comma")
    src.add(SAE, 2, "spurious", "bob")
    assert src.export_csv(tmp_path / "v.csv") == 2
    dst = LabelStore(tmp_path / "b.sqlite")
    assert dst.import_csv(tmp_path / "v.csv") == 2
    assert dst.import_csv(tmp_path / "v.csv") == 0  # importing again adds nothing
    assert [(v.neuron, v.verdict, v.note) for v in dst.history(SAE)] == [
        (1, "clinical", "note, with comma"),
        (2, "spurious", ""),
    ]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(StoreError, match="not a verdict export"):
        dst.import_csv(tmp_path / "bad.csv")


def test_corrupt_database_gives_a_typed_error_and_is_left_alone(tmp_path):
    db = tmp_path / "labels.sqlite"
    db.write_bytes(b"this is not sqlite" * 100)
    before = db.read_bytes()
    with pytest.raises(StoreError, match="cannot open the label database"):
        LabelStore(db)
    assert db.read_bytes() == before
    assert not isinstance(StoreError("x"), sqlite3.Error)
    assert os.path.exists(db)


def test_queries_and_per_image_verdicts(tmp_path):
    with LabelStore(tmp_path / "l.sqlite") as store:
        store.add("s", 4, "clinical", "ann", concept="mass")
        store.add("s", 4, "spurious", "ann", image_uid="1.2.3", concept="mass")
        store.add("s", 5, "unsure", "bob", concept="calcification")
        assert [v.neuron for v in store.verdicts("s", rater="ann")] == [4, 4]
        assert [v.verdict for v in store.verdicts(concept="calcification")] == ["unsure"]
        assert [v.image_uid for v in store.verdicts("s", neuron=4, image_uid="1.2.3")] == ["1.2.3"]
        # the per-image verdict does not replace the neuron-level one
        assert [v.verdict for v in store.latest("s", 4, "ann")] == ["clinical"]
        assert [v.verdict for v in store.latest("s", 4, "ann", image_uid="1.2.3")] == ["spurious"]
        assert store.counts("s") == {"clinical": 1, "spurious": 0, "unsure": 1}


def test_threads_writing_through_two_connections_lose_nothing(tmp_path):
    import threading

    db = tmp_path / "labels.sqlite"
    LabelStore(db).close()
    errors = []

    def write(rater):
        try:
            with LabelStore(db) as store:
                for n in range(25):
                    store.add("s", n, "clinical", rater)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(r,)) for r in ("ann", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with LabelStore(db) as store:
        assert len(store.history("s")) == 50
        assert store.cohen_kappa("ann", "bob", "s") == (1.0, 25)


def test_unwritable_places_and_bad_rows_give_clear_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the label database"):
        LabelStore(blocker / "labels.sqlite")
    with LabelStore(tmp_path / "l.sqlite") as store:
        store.add(SAE, 1, "clinical", "ann")
        with pytest.raises(StoreError, match="cannot write"):
            store.export_csv(blocker / "out.csv")
        bad = tmp_path / "bad_rows.csv"
        store.export_csv(bad)
        lines = bad.read_text().splitlines()
        # a valid row followed by a damaged one: the whole import is refused, nothing half-merged
        good = lines[1].replace(",ann,", ",cat,")
        bad.write_text("\n".join([lines[0], good, lines[1].replace("clinical", "maybe")]) + "\n")
        with pytest.raises(StoreError, match="line 3"):
            store.import_csv(bad)
        assert store.raters(SAE) == ["ann"]


# --- schema versions, migration of old files, review fixes ----------------------------------------
_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sae_hash TEXT NOT NULL,
    neuron INTEGER NOT NULL,
    image_uid TEXT NOT NULL DEFAULT '',
    concept TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL CHECK (verdict IN ('clinical', 'spurious', 'unsure')),
    rater TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    created_utc TEXT NOT NULL,
    UNIQUE (sae_hash, neuron, image_uid, rater, created_utc, verdict, note)
);
CREATE INDEX verdicts_by_neuron ON verdicts (sae_hash, neuron);
INSERT INTO schema_version VALUES (1);
"""


def make_v1_file(path, rows):
    """A label file exactly as the single-reader plugin (schema 1, before Alembic) wrote it."""
    db = sqlite3.connect(str(path))
    db.executescript(_V1_SCHEMA)
    db.executemany(
        "INSERT INTO verdicts (sae_hash, neuron, image_uid, concept, verdict, rater, note,"
        " created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.commit()
    db.close()


V1_ROWS = [
    (SAE, 7, "", "mass", "clinical", "ann", "round mass", "2026-11-30T10:00:00.000001Z"),
    (SAE, 7, "", "mass", "spurious", "ann", "", "2026-11-30T10:05:00.000000Z"),
    (SAE, 9, "1.2.3", "mass", "unsure", "ann", "", "2026-11-30T10:06:00.000000Z"),
    (SAE, 9, "", "mass", "clinical", "bob", "", "2026-11-30T10:07:00.000000Z"),
]


def test_a_single_reader_file_is_migrated_in_place_with_every_verdict(tmp_path):
    db = tmp_path / "labels.sqlite"
    make_v1_file(db, V1_ROWS)
    with LabelStore(db) as store:
        rows = store.verdicts(SAE)
        assert [(v.sae_hash, v.neuron, v.image_uid, v.concept, v.verdict, v.rater, v.note,
                 v.created_utc) for v in rows] == V1_ROWS  # fmt: skip
        assert len({v.uid for v in rows}) == 4 and all(v.uid for v in rows)
        assert store.verdict_of(SAE, 7, "ann") == "spurious"
        store.add(SAE, 9, "spurious", "ann")  # the migrated file takes new verdicts
    raw = sqlite3.connect(str(db))
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    (rev,) = raw.execute("SELECT version_num FROM alembic_version").fetchone()
    assert raw.execute("SELECT count(*) FROM verdicts").fetchone() == (5,)
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()
    from napari_mammo_sae.labels.migrate import HEAD, head

    assert rev == head() == HEAD  # the constant readers check without Alembic is the real head
    with LabelStore(db) as store:  # opening again changes nothing
        assert len(store.verdicts(SAE)) == 5


def test_concurrent_first_use_creates_the_schema_once(tmp_path):
    """Processes and threads opening a new file and an old one at the same moment."""
    import threading

    fresh, old = tmp_path / "fresh.sqlite", tmp_path / "old.sqlite"
    make_v1_file(old, V1_ROWS)
    go = tmp_path / "go"
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from napari_mammo_sae.labels import LabelStore
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        with LabelStore(sys.argv[1]) as store:
            store.add({SAE!r}, 1, "clinical", "proc" + str(os.getpid()))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(p)], stderr=subprocess.PIPE, text=True)
        for p in (fresh, old)
    ]
    errors = []

    def first_use(path):
        try:
            with LabelStore(path) as store:
                store.add(SAE, 1, "clinical", f"thread{threading.get_ident()}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(p,)) for p in (fresh, old) * 2]
    import time

    time.sleep(1.0)  # let the processes import and wait at the start line
    go.touch()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    assert errors == []
    for path, n in ((fresh, 3), (old, 7)):
        raw = sqlite3.connect(str(path))
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        assert len(raw.execute("SELECT * FROM alembic_version").fetchall()) == 1
        assert raw.execute("SELECT count(*) FROM verdicts").fetchone() == (n,)
        raw.close()


def test_a_file_from_a_newer_plugin_is_refused_untouched(tmp_path):
    db = tmp_path / "new.sqlite"
    LabelStore(db).close()
    raw = sqlite3.connect(str(db))
    raw.execute("UPDATE alembic_version SET version_num = '9999'")
    raw.commit()
    raw.close()
    before = db.read_bytes()
    with pytest.raises(LabelDatabaseError, match="newer napari-mammo-sae"):
        LabelStore(db)
    assert db.read_bytes() == before


def test_the_newest_verdict_is_the_last_inserted_whatever_the_clock_says(tmp_path):
    with LabelStore(tmp_path / "l.sqlite") as store:
        store.add(SAE, 3, "clinical", "ann", created_utc="2026-12-01T12:00:00.000000Z")
        # a second workstation whose clock is an hour behind records the change of mind later
        store.add(SAE, 3, "spurious", "ann", created_utc="2026-12-01T11:00:00.000000Z")
        assert store.verdict_of(SAE, 3, "ann") == "spurious"
        assert [v.verdict for v in store.history(SAE, 3)] == ["clinical", "spurious"]


def test_the_same_verdict_sent_twice_is_stored_once(tmp_path):
    with LabelStore(tmp_path / "l.sqlite") as store:
        first = store.add(SAE, 3, "clinical", "ann", uid="key-1")
        again = store.add(SAE, 3, "clinical", "ann", uid="key-1")  # a retry after a timeout
        assert first == again
        assert len(store.history(SAE)) == 1


def test_wal_is_checked_and_a_refusal_is_reported(caplog):
    from napari_mammo_sae.labels.db import _sqlite_pragmas, check_wal

    conn = sqlite3.connect(":memory:")  # SQLite answers 'memory': WAL is not possible there
    assert check_wal(conn) == "memory"
    with caplog.at_level("WARNING"):
        _sqlite_pragmas(conn, None)
    assert "could not switch to WAL" in caplog.text and "'memory'" in caplog.text
    conn.close()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("created_utc", "yesterday", "timestamp 'yesterday'"),
        ("created_utc", "2026-13-01T10:00:00Z", "timestamp"),
        ("sae_hash", "sae-abc", "not a sha256"),
        ("verdict", "Clinical ", "verdict 'Clinical' is not one of"),
        ("verdict", "spurios", "spurios"),
        ("neuron", "-3", "not a neuron id"),
    ],
)
def test_csv_import_checks_every_row_and_imports_nothing_on_error(tmp_path, column, value, message):
    with LabelStore(tmp_path / "src.sqlite") as src:
        src.add(SAE, 1, "clinical", "ann")
        src.add(SAE, 2, "spurious", "ann")
        src.export_csv(tmp_path / "v.csv")
    import csv

    with open(tmp_path / "v.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[1][column] = value
    with open(tmp_path / "bad.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with LabelStore(tmp_path / "dst.sqlite") as dst:
        with pytest.raises(StoreError, match="line 3") as err:
            dst.import_csv(tmp_path / "bad.csv")
        assert message in str(err.value)
        assert dst.verdicts() == []


def test_an_old_export_without_keys_imports_once_and_matches_the_migrated_file(tmp_path):
    old_csv = tmp_path / "old.csv"
    header = "sae_hash,neuron,image_uid,concept,verdict,rater,note,created_utc\n"
    old_csv.write_text(header + "".join(",".join(map(str, r)) + "\n" for r in V1_ROWS))
    db = tmp_path / "labels.sqlite"
    make_v1_file(db, V1_ROWS)  # the same verdicts, already in the (migrated) file
    with LabelStore(db) as store:
        assert store.import_csv(old_csv) == 0  # content keys: the same verdicts, not new ones
    with LabelStore(tmp_path / "other.sqlite") as other:
        assert other.import_csv(old_csv) == 4
        assert other.import_csv(old_csv) == 0


def test_a_url_with_a_password_is_refused_without_echoing_it():
    with pytest.raises(LabelDatabaseError, match="contains a password") as err:
        LabelStore("postgresql://ann:Sekr1t-pw@127.0.0.1:1/labels")
    assert "Sekr1t-pw" not in str(err.value)


def test_switching_a_new_file_to_wal_waits_for_another_connection_then_gives_up(tmp_path):
    """SQLite answers 'database is locked' at once while another connection holds the new file;
    the switch retries until it is free, and past its wait raises as before."""
    import threading
    import time

    from napari_mammo_sae.labels.db import check_wal

    path = tmp_path / "new.sqlite"
    holder = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # another viewer in the middle of its first use
    conn = sqlite3.connect(str(path), timeout=0)
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        check_wal(conn, wait_s=0.3)
    assert time.monotonic() - t0 >= 0.3  # it waited before giving up
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()  # the other connection finishes
    assert check_wal(conn, wait_s=5.0) == "wal"
    conn.close()
    holder.close()
