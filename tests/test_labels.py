"""The verdict store: persistence, history, kill-safety, kappa on known cases, CSV round trip."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from napari_mammo_sae.errors import StoreError
from napari_mammo_sae.labels import LabelStore, cohen_kappa, fleiss_kappa


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
    src.add("s", 1, "clinical", "ann", "note, with comma")
    src.add("s", 2, "spurious", "bob")
    assert src.export_csv(tmp_path / "v.csv") == 2
    dst = LabelStore(tmp_path / "b.sqlite")
    assert dst.import_csv(tmp_path / "v.csv") == 2
    assert dst.import_csv(tmp_path / "v.csv") == 0  # importing again adds nothing
    assert [(v.neuron, v.verdict, v.note) for v in dst.history("s")] == [
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
        store.add("s", 1, "clinical", "ann")
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
        assert store.raters("s") == ["ann"]
