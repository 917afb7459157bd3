"""The labelling widget in a real viewer: keys on the canvas, persistence, kappa, failures."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtTest import QTest

from napari_mammo_sae.labels import LabelStore

pytestmark = pytest.mark.gui
SAE = "e7" * 32


@pytest.fixture
def settings(tmp_path, monkeypatch):
    from napari_mammo_sae._napari.widgets import _common

    monkeypatch.setattr(_common, "settings_path", lambda: tmp_path / "settings.json")
    monkeypatch.setattr("napari_mammo_sae.labels.default_path", lambda: tmp_path / "default.sqlite")
    return tmp_path


def _viewer_with_image(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((32, 32), dtype=np.float32), name="mammogram")
    viewer.layers.selection.active = viewer.layers["mammogram"]
    return viewer


def _widget(viewer, db, rater="ann", sae="sae-abc"):
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget

    w = LabellingWidget(viewer)
    w.db_path.value = str(db)
    w._db_changed()
    w.rater.value = rater
    w.sae.value = sae
    w.sae.native.editingFinished.emit()  # as when the user leaves the field
    return w


def _key(viewer, key, qtbot):
    """A real key press on the canvas (an image layer is active, as after opening a mammogram)."""
    canvas = viewer.window._qt_viewer.canvas.native
    QTest.keyClick(canvas, key)
    qtbot.wait(10)


def test_canvas_keys_record_verdicts_and_they_survive_a_new_viewer(
    make_napari_viewer, settings, qtbot
):
    db = settings / "verdicts.sqlite"
    viewer = _viewer_with_image(make_napari_viewer)
    w = _widget(viewer, db)
    w.neuron.value = 40
    _key(viewer, "1", qtbot)  # clinical on 40
    assert "saved" in w.saved.text() and "neuron 40 clinical" in w.saved.text()
    assert viewer.layers["mammogram"].mode == "pan_zoom"  # the key was ours, not the layer's
    _key(viewer, "]", qtbot)  # no explorer list: next id
    assert w.neuron.value == 41
    _key(viewer, "2", qtbot)  # spurious on 41
    _key(viewer, "[", qtbot)
    _key(viewer, "3", qtbot)  # unsure on 40 (history kept: clinical, then unsure)
    assert w.history.count() == 2
    with LabelStore(db) as store:  # on disk now, through another connection
        assert [v.verdict for v in store.history("sae-abc", 40)] == ["clinical", "unsure"]
        assert store.verdict_of("sae-abc", 41, "ann") == "spurious"
    viewer.close()

    v2 = make_napari_viewer()
    w2 = _widget(v2, db, rater="")  # a fresh widget remembers nothing but the database
    w2.neuron.value = 40
    items = [w2.history.item(i).text() for i in range(w2.history.count())]
    assert len(items) == 2 and "ann: unsure" in items[0] and "ann: clinical" in items[1]
    assert "clinical 0, spurious 1, unsure 1" in w2.agreement.text()


def test_two_raters_kappa_on_a_known_case(make_napari_viewer, settings, qtbot):
    # 10 neurons; agree on 8 (5 clinical, 3 spurious), disagree on 2 -> kappa = 0.28/0.48 = 0.583
    ann = ["1"] * 5 + ["2"] * 3 + ["1", "2"]
    bob = ["1"] * 5 + ["2"] * 3 + ["2", "1"]
    viewer = _viewer_with_image(make_napari_viewer)
    w = _widget(viewer, settings / "k.sqlite")
    for rater, keys in (("ann", ann), ("bob", bob)):
        w.rater.value = rater
        w.neuron.value = 0
        for key in keys:
            _key(viewer, key, qtbot)
            _key(viewer, "]", qtbot)
    assert "Cohen's kappa ann vs bob: 0.58 (10 neurons)" in w.agreement.text()
    w.rater.value = "cy"
    w.neuron.value = 0
    w.record("clinical")
    assert "Fleiss' kappa, 3 raters" in w.agreement.text()
    assert "(1 neurons)" in w.agreement.text()  # only neuron 0 was rated by all three


def test_explorer_session_drives_the_neuron_and_per_image_verdicts(
    make_napari_viewer, settings, qtbot
):
    from types import SimpleNamespace

    from napari_mammo_sae._napari.widgets._common import ImageResult

    viewer = _viewer_with_image(make_napari_viewer)
    w = _widget(viewer, settings / "s.sqlite", sae="")
    s = w.session
    analysis = SimpleNamespace(sop_instance_uid="1.2.840.99")
    s.results["mammogram"] = ImageResult("mammogram", analysis, None, np.array([7, 3, 9]),
                                         np.zeros(3), np.zeros((3, 2, 2)), box_iou={7: 0.6, 3: 0.0})  # fmt: skip
    s.sae_hash = "from-explorer"
    s.analysis_changed.emit(s)
    s.set_neuron(7)
    assert w.neuron.value == 7 and w.sae.value == "from-explorer"
    _key(viewer, "]", qtbot)
    assert w.neuron.value == 3 and s.neuron == 3  # the explorer's top list, in rank order
    _key(viewer, "2", qtbot)  # spurious on 3; its box IoU 0.0 says off the lesion: agreement
    _key(viewer, "[", qtbot)
    w.per_image.value = True
    _key(viewer, "1", qtbot)
    assert "(this image)" in w.saved.text()
    with LabelStore(settings / "s.sqlite") as store:
        (v,) = store.verdicts("from-explorer", neuron=7)
        assert v.image_uid == "1.2.840.99" and v.concept == s.concept
    w.per_image.value = False
    _key(viewer, "1", qtbot)  # neuron-level clinical on 7, IoU 0.6: on the lesion, agrees
    assert "vs box agreement" in w.agreement.text()
    assert "2 neurons: 100% agree" in w.agreement.text()


def test_unsaved_verdicts_say_so_and_never_crash(make_napari_viewer, settings, qtbot):
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    viewer = _viewer_with_image(make_napari_viewer)
    blocker = settings / "a_file"
    blocker.write_text("x")
    w = _widget(viewer, blocker / "labels.sqlite")  # a folder that cannot exist
    assert "label database unavailable" in w.agreement.text()
    _key(viewer, "1", qtbot)
    assert "NOT saved" in w.saved.text()
    w2 = _widget(viewer, settings / "ok.sqlite", rater="")
    assert w2.record("spurious") is None and "rater" in w2.saved.text()
    notification_manager.notification_ready.disconnect(seen.append)
    assert sum("verdict not saved" in str(n.message) for n in seen) >= 2


def test_keys_go_back_to_napari_when_the_widget_is_gone(make_napari_viewer, settings, qtbot):
    viewer = _viewer_with_image(make_napari_viewer)
    w = _widget(viewer, settings / "g.sqlite")
    w.native.setParent(None)
    w.native.deleteLater()
    qtbot.waitUntil(lambda: not _alive(w.native), timeout=5000)
    _key(viewer, "2", qtbot)  # napari's own binding for an image layer again: transform mode
    assert viewer.layers["mammogram"].mode == "transform"
    with LabelStore(settings / "g.sqlite") as store:
        assert store.history("sae-abc") == []


def test_csv_export_and_import_between_databases(make_napari_viewer, settings, monkeypatch, qtbot):
    import magicgui.widgets
    from qtpy.QtWidgets import QFileDialog

    from napari_mammo_sae._napari.widgets import labelling

    asked, seen = [], []

    def dialog(mode, caption, start, filter, parent=None):  # magicgui's file dialog, answered
        asked.append((mode, caption, start, filter))
        return None if caption == "SAE weights" else str(settings / "v.csv")

    class SaveDialog:  # stands in for QFileDialog in the widget's module (Qt's class untouched)
        Option = QFileDialog.Option

        @staticmethod
        def getSaveFileName(*args, **kwargs):  # noqa: N802 - Qt's name
            seen.append((args[1:], kwargs))
            return str(settings / "b.sqlite"), ""

    monkeypatch.setattr(magicgui.widgets, "show_file_dialog", dialog)
    monkeypatch.setattr(labelling, "QFileDialog", SaveDialog)
    viewer = _viewer_with_image(make_napari_viewer)
    a = _widget(viewer, settings / "a.sqlite", sae=SAE)
    a.record("clinical")
    a.note.value = "bright cluster"
    a.record("spurious")
    assert a.export_csv(settings / "v.csv") == 2
    a.io[0].native.click()  # "export CSV...": the same through the dialog
    assert "exported 2 verdicts to v.csv" in a.saved.text()
    b = _widget(viewer, settings / "b.sqlite", sae=SAE)
    assert b.import_csv(settings / "v.csv") == 2
    b.io[1].native.click()  # "import CSV...": nothing new
    assert "imported 0 new verdicts from v.csv" in b.saved.text()
    assert "spurious" in b.history.item(0).text() and "bright cluster" in b.history.item(0).text()
    # a long note wraps in the dock's width instead of running off under a side scroll bar
    a.note.value = "fine linear branching calcifications along a duct, " * 3
    a.record("clinical")
    qtbot.addWidget(a.native)  # shown on its own, closed with the test
    a.native.resize(320, 600)
    a.native.show()
    qtbot.waitUntil(lambda: a.history.count() == 3 and a.history.isVisible())
    row = a.history.visualItemRect(a.history.item(0))
    assert row.width() <= a.history.viewport().width()
    assert row.height() > 2 * a.history.fontMetrics().height()  # on several lines
    assert a.history.horizontalScrollBar().maximum() == 0
    b[3][1].native.click()  # the SAE's "...", cancelled: nothing to hash
    assert b.worker is None and b.sae.value == SAE
    assert asked == [
        ("w", "Export verdicts", "verdicts.csv", "CSV (*.csv)"),
        ("r", "Import verdicts", "", "CSV (*.csv)"),
        ("r", "SAE weights", "", "SAE weights (*.safetensors *.pt *.pth)"),
    ]
    # the database's "...": a save dialog from the current file that opens an existing one
    # without asking to overwrite it
    b[0][1].native.click()
    assert seen == [
        (
            ("Label database", str(settings / "b.sqlite"), "SQLite (*.sqlite *.db)"),
            {"options": QFileDialog.Option.DontConfirmOverwrite},
        )
    ]
    assert b.session.label_db == settings / "b.sqlite"
    # a file that is not a verdict CSV: refused with the reason, the database as it was
    (settings / "bad.csv").write_text("not,a,verdict,file\n1,2,3,4\n")
    assert b.import_csv(settings / "bad.csv") is None
    assert "import failed" in b.saved.text()
    with LabelStore(settings / "b.sqlite") as store:
        assert len(store.history(SAE)) == 2
    # the SAE's "...": the chosen weights file is hashed in the background into the field
    from napari_mammo_sae.models.folders import sae_sha256

    weights = settings / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 16)
    monkeypatch.setattr(magicgui.widgets, "show_file_dialog", lambda *a, **k: str(weights))
    b[3][1].native.click()
    qtbot.waitUntil(lambda: b.worker is None, timeout=10000)
    assert b.sae.value == sae_sha256(weights) != SAE and b.saved.text() == "SAE hash set"


def _alive(widget) -> bool:
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


def test_a_second_viewer_without_the_widget_keeps_napari_keys(make_napari_viewer, settings, qtbot):
    viewer = _viewer_with_image(make_napari_viewer)
    w = _widget(viewer, settings / "two.sqlite")
    other = _viewer_with_image(make_napari_viewer)  # no labelling widget here
    _key(other, "2", qtbot)
    assert other.layers["mammogram"].mode == "transform"
    with LabelStore(settings / "two.sqlite") as store:
        assert store.history("sae-abc") == []
    assert w.saved.text() == ""


def test_a_verdict_shown_as_saved_survives_killing_the_viewer_process(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    db = tmp_path / "killed.sqlite"
    code = textwrap.dedent(
        f"""
        import os, signal
        import napari
        import napari_mammo_sae._napari
        from napari_mammo_sae._napari.widgets import _common
        _common.settings_path = lambda: __import__("pathlib").Path({str(tmp_path)!r}) / "s.json"
        from napari_mammo_sae._napari.widgets.labelling import LabellingWidget
        viewer = napari.Viewer(show=False)
        w = LabellingWidget(viewer)
        w.db_path.value = {str(db)!r}; w._db_changed()
        w.rater.value = "ann"; w.sae.value = "sae-k"; w.neuron.value = 12
        w.record("spurious")
        print("UI:", w.saved.text(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit, no Qt teardown
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "saved" in proc.stdout and "neuron 12 spurious" in proc.stdout
    with LabelStore(db) as store:
        assert store.verdict_of("sae-k", 12, "ann") == "spurious"


# --- study mode ------------------------------------------------------------------------------------
def _wait(w, qtbot):
    qtbot.waitUntil(lambda: not w.busy(), timeout=20000)


def test_the_form_is_magicgui_with_a_verdict_enum(make_napari_viewer, settings):
    from magicgui.widgets import Container, PushButton, SpinBox

    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget, VerdictChoice
    from napari_mammo_sae.labels import VERDICTS

    w = LabellingWidget(make_napari_viewer())
    # the dock is a magicgui Container: napari docks its (scrolling) native widget
    assert isinstance(w, Container) and isinstance(w.neuron, SpinBox)
    assert w.native._magic_widget is w and w.body.isAncestorOf(w.history)
    assert tuple(v.value for v in VerdictChoice) == VERDICTS
    assert all(isinstance(b, PushButton) for b in w.verdict_buttons.values())
    w.db_path.value = str(settings / "e.sqlite")
    w._db_changed()
    w.rater.value = "ann"
    w.sae.value = SAE
    w.neuron.value = 12  # the other docks follow the magicgui value
    assert w.session.neuron == 12
    w.verdict_buttons[VerdictChoice.spurious].clicked()  # a click on the magicgui button
    assert "neuron 12 spurious" in w.saved.text()
    with LabelStore(settings / "e.sqlite") as store:
        assert store.verdict_of(SAE, 12, "ann") == "spurious"


def test_study_mode_walks_the_readers_queue_with_progress(make_napari_viewer, settings, qtbot):
    from napari_mammo_sae.labels.study import choose_neurons, create_study

    db = settings / "study.sqlite"
    with LabelStore(db) as store:
        design = create_study(store, "pilot", sae_hash=SAE, concept="mass",
                              neurons=choose_neurons(given=[3, 8, 21, 34, 55]), readers=["ann", "bob"])  # fmt: skip
        store.add(SAE, 8, "clinical", "bob", study="pilot")
    viewer = _viewer_with_image(make_napari_viewer)
    w = _widget(viewer, db, rater="ann", sae="")
    w.study_id.value = "pilot"
    w.open_study()
    _wait(w, qtbot)
    order = design.order("ann")
    assert "0 of 5" in w.progress.value and w.neuron.value == order[0]
    assert w.sae.value == SAE and w.sae.native.isReadOnly()
    _key(viewer, "2", qtbot)  # spurious on the first neuron of ann's queue
    _wait(w, qtbot)
    assert "saved" in w.saved.text() and f"neuron {order[0]} spurious" in w.saved.text()
    assert "1 of 5" in w.progress.value
    assert w.neuron.value == order[1]  # on to the next one
    _key(viewer, "]", qtbot)
    assert w.neuron.value == order[2]
    _key(viewer, "[", qtbot)
    _key(viewer, "[", qtbot)
    assert w.neuron.value == order[0]
    w.neuron.value = 8
    _wait(w, qtbot)
    assert w.history.count() == 0  # blinded: bob's verdict on 8 is not shown before ann's own
    _key(viewer, "2", qtbot)
    _wait(w, qtbot)
    assert "2 of 5" in w.progress.value
    w.neuron.value = 8
    _wait(w, qtbot)
    assert sorted(w.history.item(i).text().split("  ")[1] for i in range(w.history.count())) == [
        "ann: spurious",
        "bob: clinical",
    ]
    # the interventions dock's seam: bob clinical + ann spurious on 8 is disputed; only ann on
    # order[0] says spurious -> a majority of one
    assert w.session.study is not None
    assert w.session.study.consensus_spurious() == [order[0]]
    # ... which the interventions dock offers while the study is open
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget, Mode

    iw = InterventionWidget(viewer)
    assert (
        Mode.study_spurious in iw.mode.choices
    )  # (it needs an analysis to apply; see test_review)
    w.close_study()
    assert w.session.study is None and not w.sae.native.isReadOnly()
    assert Mode.study_spurious not in iw.mode.choices


def test_the_database_can_be_given_on_the_shell(make_napari_viewer, settings, monkeypatch):
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget

    monkeypatch.setenv("NAPARI_MAMMO_SAE_DB", str(settings / "from-shell.sqlite"))
    w = LabellingWidget(make_napari_viewer())
    assert w.db_path.value == str(settings / "from-shell.sqlite")
    assert w.session.label_db == settings / "from-shell.sqlite"


def test_a_password_typed_into_the_url_is_never_kept(make_napari_viewer, settings):
    import json

    from napari_mammo_sae._napari.widgets import _common

    w = _widget(make_napari_viewer(), settings / "x.sqlite")
    w.db_path.value = "postgresql://ann:Hunter2-secret@127.0.0.1:5999/study"
    w._db_changed()
    assert w.db_path.value == "postgresql://ann@127.0.0.1:5999/study"
    assert "taken out of the database URL" in w.saved.text()
    saved = json.loads(_common.settings_path().read_text())
    assert saved["label_db"] == "postgresql://ann@127.0.0.1:5999/study"
    assert "Hunter2-secret" not in _common.settings_path().read_text()


def test_a_reader_outside_the_study_is_told_so(make_napari_viewer, settings, qtbot):
    from napari_mammo_sae.labels.study import create_study

    db = settings / "study.sqlite"
    with LabelStore(db) as store:
        create_study(store, "pilot", sae_hash=SAE, concept="mass", neurons={1: "given"},
                     readers=["ann"])  # fmt: skip
    w = _widget(_viewer_with_image(make_napari_viewer), db, rater="zed", sae="")
    w.open_study("pilot")
    _wait(w, qtbot)
    assert "not one of the readers" in w.saved.text() and w.reader is None
    w.open_study("nope")
    _wait(w, qtbot)
    assert "no study 'nope'" in w.saved.text()


@pytest.fixture
def pg_study(postgres_server, monkeypatch):
    """A PostgreSQL database with study 'gui' (neurons 0..5) read by alice."""
    from napari_mammo_sae.labels.study import choose_neurons, create_study

    name = postgres_server.new_database("gui", "coord-pw")
    with LabelStore(postgres_server.url("coordinator", name), password="coord-pw") as coord:
        create_study(coord, "gui", sae_hash=SAE, concept="mass", neurons=choose_neurons(given=range(6)),
                     readers=["alice"], reader_passwords={"alice": "alice-gui-pw"})  # fmt: skip
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("NAPARI_MAMMO_SAE_DB_PASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")
    return postgres_server, name


def test_server_restart_the_dock_queues_then_sends(make_napari_viewer, settings, qtbot, pg_study,
                                                  monkeypatch):  # fmt: skip
    from napari_mammo_sae._napari.widgets import labelling

    server, name = pg_study
    shown = []  # what the status line says when the password is asked for
    answers = iter(["not-her-password", "alice-gui-pw"])
    monkeypatch.setattr(labelling, "ask_password",
                        lambda _w, q: shown.append(w.saved.text()) or next(answers))  # fmt: skip
    viewer = _viewer_with_image(make_napari_viewer)
    w = _widget(viewer, server.url("alice", name), rater="", sae="")
    w.open_study("gui")
    qtbot.waitUntil(lambda: w.reader is not None, timeout=20000)
    _wait(w, qtbot)
    # no password anywhere: asked; a wrong one: told so (without it) and asked again
    assert len(shown) == 2
    assert "asks user 'alice' for a password" in shown[0]
    assert "wrong password for database user 'alice'" in shown[1]
    assert not any("not-her-password" in t for t in shown + [w.saved.text()])
    assert w.reader is not None and w.rater.value == "alice" and "0 of 6" in w.progress.value
    first = w.neuron.value
    _key(viewer, "1", qtbot)
    _wait(w, qtbot)
    assert "saved" in w.saved.text()
    server.pg_ctl("stop")
    try:
        second = w.neuron.value
        _key(viewer, "2", qtbot)
        _wait(w, qtbot)
        assert "queued, will be sent" in w.saved.text() and "saved" not in w.saved.text()
        assert "2 of 6" in w.progress.value and "1 queued" in w.progress.value
    finally:
        server.pg_ctl("start")
    w._flush_outbox()  # what the dock's timer does every few seconds
    _wait(w, qtbot)
    assert "sent 1 queued verdicts" in w.saved.text()
    assert "queued" not in w.progress.value
    with LabelStore(server.url("coordinator", name), password="coord-pw") as coord:
        rows = coord.verdicts(SAE, rater="alice", study="gui")
    assert [(v.neuron, v.verdict) for v in rows] == [(first, "clinical"), (second, "spurious")]
    # outside the study the same server takes free verdicts too (sent in the background)
    w.close_study()
    w.sae.value = SAE
    w.neuron.value = 40
    _key(viewer, "3", qtbot)
    _wait(w, qtbot)
    assert "saved" in w.saved.text() and "neuron 40 unsure by alice" in w.saved.text()
    with LabelStore(server.url("coordinator", name), password="coord-pw") as coord:
        assert [(v.study, v.verdict) for v in coord.verdicts(SAE, neuron=40)] == [("", "unsure")]
    # a CSV export from the server runs in the background too (the viewer never waits on it)
    out = settings / "alice.csv"
    assert w.export_csv(out) is None  # queued: said in the status line when done
    _wait(w, qtbot)
    assert "exported 3 verdicts to alice.csv" in w.saved.text()
    assert len(out.read_text().splitlines()) == 1 + 3


def test_a_queued_verdict_the_server_refuses_is_kept_and_reported(make_napari_viewer, settings,
                                                                  qtbot):  # fmt: skip
    from napari.utils.notifications import notification_manager

    from napari_mammo_sae.labels.store import new_uid, now_utc
    from napari_mammo_sae.labels.study import create_study

    db = settings / "study.sqlite"
    with LabelStore(db) as store:
        create_study(store, "pilot", sae_hash=SAE, concept="mass", neurons={1: "given", 2: "given"},
                     readers=["ann"])  # fmt: skip
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    w = _widget(_viewer_with_image(make_napari_viewer), db, rater="ann", sae="")
    w.open_study("pilot")
    _wait(w, qtbot)
    bad = {"sae_hash": SAE, "neuron": 1, "verdict": "maybe", "rater": "ann", "note": "",
           "image_uid": "", "concept": "mass", "uid": new_uid(), "study": "pilot",
           "created_utc": now_utc()}  # fmt: skip
    w.reader.outbox.put(w.reader.target, bad)  # e.g. written by an older, buggier version
    w._flush_outbox()
    _wait(w, qtbot)
    notification_manager.notification_ready.disconnect(seen.append)
    assert any("refused 1 queued verdicts" in str(n.message) for n in seen)
    ((kept, why),) = w.reader.outbox.refused(w.reader.target)
    assert kept["uid"] == bad["uid"] and "maybe" in why
