"""Reading studies without a server: design, readers' orders, agreement on known cases, CLI, export."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mammo_sae.cli import main
from napari_mammo_sae.errors import StudyError
from napari_mammo_sae.labels import LabelStore
from napari_mammo_sae.labels.agreement import agreement, fleiss_kappa, krippendorff_alpha_counts
from napari_mammo_sae.labels.outbox import Outbox
from napari_mammo_sae.labels.study import (
    StudyConsensus,
    StudyReader,
    choose_neurons,
    create_study,
    open_study,
    study_agreement,
)

SAE = "ab" * 32


def test_the_neuron_set_mixes_top_neurons_and_seeded_random_controls():
    chosen = choose_neurons(
        top={1: [5, 9, 2], 0: [9, 40]}, given=[7], controls=4, n_latents=64, seed=3
    )
    assert {n: s for n, s in chosen.items() if s != "control"} == {
        7: "given", 5: "top class 1", 9: "top class 1", 2: "top class 1", 40: "top class 0"
    }  # fmt: skip
    controls = sorted(n for n, s in chosen.items() if s == "control")
    assert len(controls) == 4 and not set(controls) & {2, 5, 7, 9, 40}
    again = choose_neurons(
        top={1: [5, 9, 2], 0: [9, 40]}, given=[7], controls=4, n_latents=64, seed=3
    )
    assert again == chosen
    other = choose_neurons(
        top={1: [5, 9, 2], 0: [9, 40]}, given=[7], controls=4, n_latents=64, seed=4
    )
    assert sorted(n for n, s in other.items() if s == "control") != controls
    with pytest.raises(StudyError, match="number of latents"):
        choose_neurons(given=[1], controls=2)
    with pytest.raises(StudyError, match="no neurons"):
        choose_neurons()


def test_each_reader_gets_their_own_reproducible_order(tmp_path):
    with LabelStore(tmp_path / "s.sqlite") as store:
        design = create_study(store, "s1", sae_hash=SAE, concept="mass",
                              neurons=choose_neurons(given=range(40)), readers=["ann", "bob"], seed=1)  # fmt: skip
        again = open_study(store, "s1")
    assert again.order("ann") == design.order("ann")
    assert sorted(design.order("ann")) == list(range(40))
    assert design.order("ann") != design.order("bob")
    assert design.order("ann") != list(range(40))


def test_bad_designs_are_refused(tmp_path):
    with LabelStore(tmp_path / "s.sqlite") as store:
        kw = dict(sae_hash=SAE, concept="mass", neurons={1: "given"}, readers=["ann"])
        with pytest.raises(StudyError, match="sha256"):
            create_study(store, "s1", **{**kw, "sae_hash": "not-a-hash"})
        with pytest.raises(StudyError, match="database roles"):
            create_study(store, "s1", **{**kw, "readers": ["Ann Smith"]})
        with pytest.raises(StudyError, match="study id"):
            create_study(store, "bad id; drop", **kw)
        create_study(store, "s1", **kw)
        with pytest.raises(StudyError, match="exists already"):
            create_study(store, "s1", **kw)
        with pytest.raises(StudyError, match="a local file has no logins"):
            create_study(store, "s2", **kw, reader_passwords={"ann": "pw"})


def test_a_reader_walks_their_queue_and_progress_counts(tmp_path):
    with LabelStore(tmp_path / "s.sqlite") as store:
        design = create_study(store, "s1", sae_hash=SAE, concept="mass",
                              neurons=choose_neurons(given=range(5)), readers=["ann"])  # fmt: skip
        reader = StudyReader(store, "s1", Outbox(tmp_path / "out.sqlite"), reader="ann")
        assert reader.progress() == (0, 5) and reader.remaining() == design.order("ann")
        first = reader.remaining()[0]
        assert reader.record(first, "spurious")[0] == "saved"
        assert reader.progress() == (1, 5) and first not in reader.remaining()
        reader.record(first, "clinical")  # a changed mind: still one neuron done
        assert reader.progress() == (1, 5)
        with pytest.raises(StudyError, match="not in study"):
            reader.record(999, "clinical")
        with pytest.raises(StudyError, match="not one of the readers"):
            StudyReader(store, "s1", Outbox(tmp_path / "out.sqlite"), reader="zed")
        with pytest.raises(StudyError, match="no study 'nope'"):
            StudyReader(store, "nope", Outbox(tmp_path / "out.sqlite"), reader="ann")
        # a fresh session (another day) resumes where the reader stopped
        later = StudyReader(store, "s1", Outbox(tmp_path / "out.sqlite"), reader="ann")
        assert later.progress() == (1, 5) and later.remaining() == reader.remaining()
        assert store.verdict_of(SAE, first, "ann") == "clinical"


def test_krippendorff_alpha_on_krippendorffs_own_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example:
    # 4 observers, 12 units, missing values; alpha = 0.743
    nan = None
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
    codes = np.array([[-1 if v is None else v - 1 for v in row] for row in data])
    stats = agreement(codes, list("ABCD"), list(range(12)), list("12345"), n_bootstrap=200)
    assert stats.krippendorff.value == pytest.approx(0.743, abs=1e-3)
    assert stats.krippendorff.low <= stats.krippendorff.value <= stats.krippendorff.high
    assert stats.krippendorff.n == 11  # unit 12 has one value: not pairable
    assert stats.consensus[0] == "1" and stats.consensus[5] == "disputed"


def test_fleiss_with_missing_ratings_and_cohen_with_ci():
    # equal numbers of ratings: the textbook value still holds
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]  # fmt: skip
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=1e-3)
    # two readers, 10 neurons, agree on 8 -> Cohen 0.5833; a third reader who rated none
    a = [0] * 5 + [1] * 3 + [0, 1]
    b = [0] * 5 + [1] * 3 + [1, 0]
    codes = np.array([a, b])
    stats = agreement(codes, ["ann", "bob"], list(range(10)), ["clinical", "spurious", "unsure"],
                      n_bootstrap=500, seed=1)  # fmt: skip
    assert stats.cohen.value == pytest.approx(0.58333, abs=1e-4)
    assert stats.cohen.low < stats.cohen.value < stats.cohen.high
    assert stats.fleiss.value == pytest.approx(0.58333, abs=1e-4)  # two raters: Scott's pi
    same = agreement(
        codes, ["ann", "bob"], list(range(10)), ["c", "s", "u"], n_bootstrap=500, seed=1
    )
    assert (same.cohen.low, same.cohen.high) == (stats.cohen.low, stats.cohen.high)  # seeded
    # perfect agreement: alpha 1 with a degenerate CI
    perfect = agreement(np.array([a, a, a]), list("xyz"), list(range(10)), ["c", "s", "u"],
                        n_bootstrap=100)  # fmt: skip
    assert perfect.krippendorff.value == 1.0 and perfect.fleiss.value == pytest.approx(1.0)
    assert krippendorff_alpha_counts(np.array([[2, 0, 0], [2, 0, 0]])) == 1.0


def test_consensus_spurious_for_the_interventions_dock(tmp_path):
    db = tmp_path / "s.sqlite"
    with LabelStore(db) as store:
        create_study(store, "s1", sae_hash=SAE, concept="mass",
                     neurons=choose_neurons(given=range(4)), readers=["ann", "bob", "cy"])  # fmt: skip
        votes = {0: "sss", 1: "ssc", 2: "scu", 3: "ccc"}
        for n, v in votes.items():
            for reader, verdict in zip(("ann", "bob", "cy"), v, strict=True):
                full = {"s": "spurious", "c": "clinical", "u": "unsure"}[verdict]
                store.add(SAE, n, full, reader, study="s1")
        store.add(SAE, 3, "spurious", "zed")  # outside the study: does not count
        _design, stats = study_agreement(store, "s1", n_bootstrap=50)
    assert stats.consensus == {0: "spurious", 1: "spurious", 2: "disputed", 3: "clinical"}
    assert StudyConsensus(db, "s1", SAE).consensus_spurious() == [0, 1]


def test_the_study_command_creates_reports_and_exports(tmp_path, capsys):
    db = str(tmp_path / "study.sqlite")
    assert main(["study", "create", "--db", db, "--study", "pilot", "--sae", SAE,
                 "--concept", "calcification", "--neurons", "3,4,5", "--controls", "2",
                 "--n-latents", "32", "--reader", "ann", "--reader", "bob"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "study pilot" in out and "5 neurons (control 2, given 3)" in out
    with LabelStore(db) as store:
        for n in (3, 4, 5):
            store.add(SAE, n, "spurious", "ann", study="pilot")
        store.add(SAE, 3, "spurious", "bob", study="pilot")
    assert main(["study", "status", "--db", db, "--study", "pilot"]) == 0
    out = capsys.readouterr().out
    assert "ann: 3 of 5" in out and "bob: 1 of 5" in out
    assert main(["study", "export", "--db", db, "--study", "pilot", "--out", str(tmp_path / "x"),
                 "--bootstrap", "100"]) == 0  # fmt: skip
    report = (tmp_path / "x" / "pilot-report.md").read_text()
    assert "# Reading study pilot" in report and "Krippendorff" in report
    assert "Spurious by consensus: 3, 4, 5" in report
    assert main(["study", "status", "--db", db, "--study", "nope"]) == 7
    assert "no study 'nope'" in capsys.readouterr().err
    assert main(["study", "status", "--db", "postgresql://ann:pw123@127.0.0.1:9/x"]) != 0
    err = capsys.readouterr().err
    assert "contains a password" in err and "pw123" not in err


def test_study_create_takes_the_top_k_of_each_class_from_a_probe(tmp_path, capsys):
    from napari_mammo_sae.pipeline.probe import ProbeResult, save_probe

    m = 48
    scores = np.zeros((2, m))
    scores[1, [11, 12, 13]] = [3.0, 2.0, 1.0]  # class 1 (e.g. mass present): 11, 12, 13
    scores[0, [20, 21, 22]] = [3.0, 2.0, 1.0]
    probe = ProbeResult(SAE, "mass", np.zeros((2, m)), np.array([5, 5]), {"class-mean": scores},
                        {}, {})  # fmt: skip
    path = save_probe(probe, tmp_path / "probe.npz")
    db = str(tmp_path / "p.sqlite")
    assert main(["study", "create", "--db", db, "--study", "p", "--probe", str(path),
                 "--top-k", "2", "--controls", "3", "--concept", "mass", "--reader", "ann"]) == 0  # fmt: skip
    with LabelStore(db) as store:
        design = open_study(store, "p")
    assert design.sae_hash == SAE
    assert {n: s for n, s in design.neurons.items() if s != "control"} == {
        11: "top class 1", 12: "top class 1", 20: "top class 0", 21: "top class 0"
    }  # fmt: skip
    assert sum(s == "control" for s in design.neurons.values()) == 3
    assert all(n < m for n in design.neurons)


def test_study_create_from_the_bundled_probe(tmp_path, capsys):
    from pathlib import Path

    probe = Path(__file__).parents[1] / "weights" / "probes" / "calcification.npz"
    db = str(tmp_path / "b.sqlite")
    assert main(["study", "create", "--db", db, "--study", "calc", "--probe", str(probe),
                 "--top-k", "5", "--controls", "5", "--concept", "calcification",
                 "--reader", "ann", "--reader", "bob"]) == 0  # fmt: skip
    assert "study calc in b.sqlite" in capsys.readouterr().out
    with LabelStore(db) as store:
        design = open_study(store, "calc")
    from napari_mammo_sae.pipeline.probe import load_probe

    p = load_probe(probe)
    assert design.sae_hash == p.sae_sha256
    assert {n for n, s in design.neurons.items() if s == "top class 1"} == set(
        p.top(1, "class-mean", 5)
    )
    assert sum(s == "control" for s in design.neurons.values()) == 5


def test_the_outbox_sends_in_order_and_keeps_what_the_store_refuses(tmp_path):
    from napari_mammo_sae.labels.store import new_uid, now_utc

    outbox = Outbox(tmp_path / "outbox.sqlite")

    def row(neuron, verdict):
        return {"sae_hash": SAE, "neuron": neuron, "verdict": verdict, "rater": "ann", "note": "",
                "image_uid": "", "concept": "mass", "uid": new_uid(), "study": "",
                "created_utc": now_utc()}  # fmt: skip

    rows = [row(1, "clinical"), row(2, "maybe"), row(3, "spurious"), row(1, "unsure")]
    for r in rows:
        outbox.put("here", r)
    outbox.put("here", rows[0])  # the same verdict queued twice: kept once
    assert [r["neuron"] for r in outbox.pending("here")] == [1, 2, 3, 1]
    with LabelStore(tmp_path / "s.sqlite") as store:
        result = outbox.flush(store, "here")
        assert result.sent == [rows[0]["uid"], rows[2]["uid"], rows[3]["uid"]]
        assert result.refused == 1 and result.left == 0
        assert [(v.neuron, v.verdict) for v in store.verdicts(SAE)] == [
            (1, "clinical"), (3, "spurious"), (1, "unsure")
        ]  # fmt: skip
        assert store.verdict_of(SAE, 1, "ann") == "unsure"  # the newer one, sent later
    ((kept, why),) = outbox.refused("here")
    assert kept["uid"] == rows[1]["uid"] and "unknown verdict 'maybe'" in why
    assert outbox.pending("here") == []
    with pytest.raises(StudyError, match="enter your reader name"):
        with LabelStore(tmp_path / "s.sqlite") as store:
            create_study(store, "s1", sae_hash=SAE, concept="mass", neurons={1: "given"},
                         readers=["ann"])  # fmt: skip
            StudyReader(store, "s1", outbox)


def test_what_the_labelling_dock_shows_is_built_without_qt(tmp_path, monkeypatch):
    from napari_mammo_sae.labels import reading

    monkeypatch.setattr("napari_mammo_sae.labels.outbox.default_outbox_path",
                        lambda: tmp_path / "out.sqlite")  # fmt: skip
    db = tmp_path / "s.sqlite"
    with LabelStore(db) as store:
        # free labelling: history newest first, counts, Cohen's kappa, verdicts vs the boxes
        for rater in ("ann", "bob"):
            store.add("free", 1, "clinical", rater, "on the cluster" if rater == "ann" else "")
            store.add("free", 2, "spurious", rater)
        store.add("free", 2, "clinical", "ann", image_uid="1.2.840.123456789")  # one image only
        lines, text = reading.neuron_texts(store, "free", 1, box_iou={1: 0.6, 2: 0.0, 3: np.nan})
        assert [line.split("  ")[1] for line in lines] == [
            "bob: clinical",
            "ann: clinical - on the cluster",
        ]
        assert lines[0][10] == " " and lines[0][16:22] == " UTC  "  # "YYYY-MM-DD HH:MM UTC  "
        assert reading.neuron_texts(store, "free", 2)[0][0].endswith(
            "ann: clinical [image ...23456789]"
        )
        assert text.splitlines() == [
            "verdicts: clinical 2, spurious 2, unsure 0",
            "Cohen's kappa ann vs bob: 1.00 (2 neurons)",
            "vs box agreement (IoU >= 0.25 = on lesion), 2 neurons: 100% agree, kappa 1.00; "
            "clinical on/off 1/0, spurious on/off 0/1",
        ]
        store.add("free", 1, "unsure", "cy")
        assert "Fleiss' kappa, 3 raters: " in reading.neuron_texts(store, "free", 1)[1]
        assert "kappa: needs a second rater" in reading.agreement_text(store, "other")
        # a study: blinded until the reader's own verdict, the study's agreement, progress
        create_study(store, "s1", sae_hash=SAE, concept="mass",
                     neurons=choose_neurons(given=[3, 8]), readers=["ann", "bob"])  # fmt: skip
        store.add(SAE, 8, "clinical", "bob", study="s1")
    reader = reading.open_reader(db, "s1", "ann")
    try:
        lines, text = reading.neuron_texts(reader.store, SAE, 8, reader)
        assert lines == [] and "Krippendorff's alpha" in text and "the dock hides them" in text
        assert reading.progress_text(reader) == "<b>0 of 2</b> neurons in study s1"
        reader.record(8, "spurious")
        lines, _ = reading.neuron_texts(reader.store, SAE, 8, reader)
        assert [line.split("  ")[1] for line in lines] == ["ann: spurious", "bob: clinical"]
        reader.record(3, "clinical")
        done = reading.progress_text(reader)
        assert done == "<b>2 of 2</b> neurons in study s1 - all done, thank you"
    finally:
        reader.store.close()
    with pytest.raises(StudyError, match="not one of the readers"):
        reading.open_reader(db, "s1", "zed")
    # the address the dock keeps: never with a password
    assert reading.without_password("postgresql://ann:secret@db:5432/labels") == (
        "postgresql://ann@db:5432/labels"
    )
    assert reading.without_password("postgresql://ann@db/labels") is None
    assert reading.without_password(str(db)) is None
