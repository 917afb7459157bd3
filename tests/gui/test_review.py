"""The review widgets driven end to end in a real viewer on a phantom exam with a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mammo_sae._napari.inserts import holding
from napari_mammo_sae.analysis.interventions import intervened_logits, topk_union

pytestmark = pytest.mark.gui

PLUGIN = "napari-mammo-sae"


@pytest.fixture(scope="module")
def exam(tmp_path_factory):
    """A small phantom dataset (VinDr layout) and tiny classifier + SAE weight folders."""
    from napari_mammo_sae.models.backbone import create_backbone
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.models.weights import save_weights
    from napari_mammo_sae.phantom.dataset import PhantomConfig, write_dataset

    root = tmp_path_factory.mktemp("review")
    cfg = PhantomConfig(studies=2, seed=5, height=448, width=368, spacing_mm=0.6,
                        mass_rate=0.5, calc_rate=0.5)  # fmt: skip
    write_dataset(cfg, root / "data", workers=1)
    torch.manual_seed(0)
    clf = ConceptClassifier(create_backbone("test_efficientnet")).eval()
    save_weights(root / "clf", clf, {"kind": "classifier", "backbone": "test_efficientnet",
                                      "input_size": [192, 128], "preprocess": "mammoclip"})  # fmt: skip
    sae = SparseAutoencoder(256, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # some latents fire on random features
    save_weights(root / "sae", sae, sae.config())
    return root


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch, exam):
    from napari_mammo_sae._napari.widgets import _common

    monkeypatch.setattr(_common, "settings_path", lambda: tmp_path / "settings.json")
    monkeypatch.setattr("napari_mammo_sae.labels.default_path", lambda: tmp_path / "labels.sqlite")
    v = make_napari_viewer()
    v.open(str(next((exam / "data" / "images").iterdir())), plugin=PLUGIN)
    return v


def _explorer(viewer, exam, qtbot, k=5):
    from napari_mammo_sae._napari.model_choice import Source
    from napari_mammo_sae._napari.widgets.explorer import NeuronExplorer

    w = NeuronExplorer(viewer)
    w.source.value = Source.files
    w.classifier_path.value = exam / "clf"
    w.sae_path.value = exam / "sae" / "config.json"  # a file inside a weights folder: the folder
    w.k.value = k
    w.device.value = "cpu"
    return w


def _press(viewer, key):
    """Call the viewer's binding for a key, as napari does on a key press."""
    func = next(f for k, f in viewer.keymap.items() if str(k) == key)
    func(viewer)


def _run(w, qtbot):
    worker = w.run()
    assert worker is not None, w.last_error
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120_000)
    assert w.last_error is None, w.last_error


def test_review_docks_stacked_fit_a_1080p_screen(viewer, exam, qtbot):
    """Docks stacked in one dock area, as the Plugins menu adds them: the window can still be
    1,000 px tall (their forms scroll) instead of being pushed past a 1080p screen - the
    explorer, interventions and labelling together, and the gallery with the plots."""
    from qtpy.QtWidgets import QScrollArea

    from napari_mammo_sae._napari.widgets.gallery import NeuronGallery
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget
    from napari_mammo_sae._napari.widgets.plots import PlotsWidget

    w = _explorer(viewer, exam, qtbot)
    window = viewer.window._qt_window

    def stacked(*widgets):
        docks = [viewer.window.add_dock_widget(x, name=type(x).__name__, area="right")
                 for x in widgets]  # fmt: skip
        viewer.window.show()
        window.resize(1600, 1000)
        qtbot.waitUntil(lambda: window.height() == 1000)
        assert window.minimumSizeHint().height() < 1000
        return docks

    labelling = LabellingWidget(viewer)
    docks = stacked(w, InterventionWidget(viewer), labelling)
    scroll = w.native
    assert isinstance(scroll, QScrollArea) and scroll.widget() is w.body
    assert scroll.parentWidget() is not None  # napari docked the scroll area, not the form
    bar = scroll.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0)  # the dock is shorter than the form: it scrolls
    scroll.ensureWidgetVisible(w.export_button.native)
    qtbot.waitUntil(lambda: bar.value() > 0)
    assert w.export_button.native.visibleRegion().boundingRect().height() > 0
    labelling.native.ensureWidgetVisible(labelling.io.native)  # the labelling dock's last row
    qtbot.waitUntil(lambda: labelling.io.native.visibleRegion().boundingRect().height() > 0)
    for dock in docks:
        viewer.window.remove_dock_widget(dock)
    gallery, plots = NeuronGallery(viewer), PlotsWidget(viewer)
    docks = stacked(gallery, plots)
    assert (
        gallery.canvas.parentWidget() is gallery.body and plots.canvas.parentWidget() is plots.body
    )


def test_pacs_dock_stacked_with_the_review_docks_fits_a_1080p_screen(viewer, exam, qtbot):
    """Opening exams from the PACS with the explorer and the interventions open: the PACS form
    scrolls too (alone it needs 591 px)."""
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget
    from napari_mammo_sae._napari.widgets.pacs import PacsDock

    pacs = PacsDock(viewer)
    for x in (_explorer(viewer, exam, qtbot), pacs, InterventionWidget(viewer)):
        viewer.window.add_dock_widget(x, name=type(x).__name__, area="right")
    viewer.window.show()
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    qtbot.waitUntil(lambda: window.height() == 1000)
    assert window.minimumSizeHint().height() < 1000
    assert pacs.native.widget() is pacs.body  # napari docked the scroll area


def test_a_run_resizes_neither_the_window_nor_the_canvas(viewer, exam, qtbot):
    """What a run brings (the overlays' layer-control panels, the probability line) must not
    raise the docks' minimum sizes: that shrinks the canvas, or grows the whole window when it
    is at its smallest, and repaints all of it in the middle of the run (and the reader's image
    jumps)."""
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget

    w = _explorer(viewer, exam, qtbot, k=3)
    viewer.window.add_dock_widget(w, name="Neuron explorer", area="right")
    viewer.window.add_dock_widget(InterventionWidget(viewer), name="Interventions", area="right")
    viewer.window.show()
    window, canvas = viewer.window._qt_window, viewer.window._qt_viewer.canvas.native
    window.resize(window.minimumSizeHint())  # as small as the docks allow: any growth shows
    qtbot.wait(300)
    before = (window.size(), canvas.size())
    _run(w, qtbot)
    qtbot.wait(300)
    assert w.probability.value and len(w._overlay_layers()) >= 3
    assert (window.size(), canvas.size()) == before


def test_explorer_layers_sit_on_the_crop_box_and_rerun_updates_them(viewer, exam, qtbot):
    w = _explorer(viewer, exam, qtbot)
    n_images = len(viewer.layers)
    chosen = w.image.choices[0]
    w.image.value = chosen
    viewer.layers.selection.active = chosen
    _run(w, qtbot)
    assert viewer.layers.selection.active is chosen  # the overlays do not steal the selection
    res = w.session.current
    a = res.analysis
    assert [int(w.table.data[r, 1]) for r in range(w.table.shape[0])] == [
        int(n) for n in res.neurons
    ]
    overlays = [lay for lay in viewer.layers if "mammo_sae" in lay.metadata]
    assert len(overlays) == 5
    assert "P(calcification)" in w.probability.value
    lay = overlays[0]
    assert lay.data.shape == a.grid  # never upsampled
    assert lay.blending == "additive"
    assert lay.colormap.colors[0][3] == 0.0  # transparent at zero
    # the top-left edge of cell (0, 0) lands on the crop box's top-left corner in world mm
    r0, c0, r1, c1 = a.geometry.crop_box
    want = res.placement.edge_to_world(np.array([[r0, c0], [r1, c1]]))
    scale, translate = np.asarray(lay.scale), np.asarray(lay.translate)
    h, w_ = a.grid
    got_tl = translate - scale / 2
    got_br = translate + scale * (np.array([h, w_]) - 0.5)
    np.testing.assert_allclose(np.minimum(got_tl, got_br), want.min(axis=0), atol=1e-6)
    np.testing.assert_allclose(np.maximum(got_tl, got_br), want.max(axis=0), atol=1e-6)
    assert (
        len({tuple(np.round(o.colormap.colors[-1], 3)) for o in overlays}) == 5
    )  # distinct colours
    assert [o.visible for o in overlays].count(True) == 1
    # clicking a row shows that neuron alone
    w._row_clicked(2, 0)
    visible = [o for o in overlays if o.visible]
    assert [o.metadata["mammo_sae"]["neuron"] for o in visible] == [int(res.neurons[2])]
    # re-running reuses the layers
    _run(w, qtbot)
    assert len(viewer.layers) == n_images + 5
    w.remove_overlays()
    assert len(viewer.layers) == n_images


def test_model_paths_are_remembered_unless_gone(viewer, exam, qtbot, tmp_path):
    import json

    from napari_mammo_sae._napari.model_choice import Source
    from napari_mammo_sae._napari.widgets.explorer import NeuronExplorer

    w = _explorer(viewer, exam, qtbot, k=2)
    _run(w, qtbot)
    again = NeuronExplorer(viewer)  # a later session
    assert again.classifier_path.value == exam / "clf"
    assert again.sae_path.value == exam / "sae"
    # a remembered folder that was moved or deleted is not offered again
    settings = tmp_path / "settings.json"
    data = json.loads(settings.read_text())
    data["sae_path"] = str(tmp_path / "deleted-sae")
    settings.write_text(json.dumps(data))
    later = NeuronExplorer(viewer)
    assert later.sae_path.value is None and later.classifier_path.value == exam / "clf"
    # the probe is a file, taken as chosen; classifier/SAE: a file in a weights folder is the folder
    probe = tmp_path / "p.npz"
    probe.write_bytes(b"")
    later.source.value = Source.files
    later.probe_path.value, later.sae_path.value = probe, exam / "sae" / "model.safetensors"
    assert later.choice().probe == probe and later.choice().sae == exam / "sae"


def test_explorer_stack_option_and_all_views(viewer, exam, qtbot):
    w = _explorer(viewer, exam, qtbot, k=3)
    w.stack.value = True
    w.all_views.value = True
    _run(w, qtbot)
    stacks = [
        lay for lay in viewer.layers if lay.metadata.get("mammo_sae", {}).get("kind") == "stack"
    ]
    assert len(stacks) == 4  # one per view of the exam
    assert stacks[0].data.shape[0] == 3 and stacks[0].ndim == 3
    # choosing another view shows that view's analysis: table, texts, current neuron
    views = list(w.session.results)
    other = next(v for v in views if v != w.session.current_layer)
    w.image.value = viewer.layers[other]
    res = w.session.results[other]
    assert w.session.current_layer == other and w.status.value.startswith(other)
    assert [int(w.table.data[r, 1]) for r in range(3)] == [int(n) for n in res.neurons]
    assert f"{res.analysis.probability:.3f}" in w.probability.value
    assert w.show_view("not a view") is False


def test_intervened_probability_equals_the_core_closed_form(viewer, exam, qtbot):
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget, Mode

    w = _explorer(viewer, exam, qtbot)
    iw = InterventionWidget(viewer)
    _run(w, qtbot)
    iw.mode.value = Mode.topk_remove
    iw.k.value = 3
    result = iw.recompute()
    cur = w.session.current
    a = cur.analysis
    contrib = np.asarray(a.logit_contributions)
    neurons = topk_union(-contrib, contrib, 3)
    sae, clf = w.session.models.analyzer.sae, w.session.models.analyzer.classifier
    logit = intervened_logits(a.pooled_latents[None, :], sae, clf.head, neurons, "remove")[0]
    assert result.mode == "remove"
    for k in (1, 7, 50, 3):  # the widget sorts once per analysis; each k is the core's set
        iw.k.value = k
        assert iw.neuron_set()[0] == [int(n) for n in topk_union(-contrib, contrib, k)]
    assert result.probability == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-6)
    assert f"{result.probability:.3f}" in iw.intervened.value
    # the CAM layer is built at once and added over the next event-loop turns, holding the
    # latest update's map, without taking the user's layer selection
    cam_name = f"{cur.layer_name} · CAM (intervened)"
    selected = set(viewer.layers.selection)
    qtbot.waitUntil(lambda: cam_name in viewer.layers, timeout=10_000)
    cam = viewer.layers[cam_name]
    assert cam.data.shape == a.grid
    np.testing.assert_allclose(cam.data, a.reconstruction_cam(list(neurons), "remove"), atol=1e-5)
    assert set(viewer.layers.selection) == selected
    qtbot.waitUntil(lambda: not holding(viewer.window._qt_window), timeout=10_000)
    assert not viewer.window._qt_viewer.canvas._pause_scene_graph
    assert cam in viewer.window._qt_viewer.controls.widgets  # its panel, a turn after the insert
    # the widget's fast CAM equals the core's for both modes and for large sets
    for how, ns in [
        ("remove", list(neurons)),
        ("keep", list(neurons)),
        ("remove", list(range(50))),
    ]:
        np.testing.assert_allclose(iw.cam(a, ns, how), a.reconstruction_cam(ns, how), atol=1e-5)
    iw.mode.value = Mode.custom_keep
    iw.custom.value = "0, 2-3"
    assert list(iw.recompute().neurons) == [0, 2, 3]
    # the CAM layer follows each update (written in place), hidden or shown
    np.testing.assert_allclose(cam.data, a.reconstruction_cam([0, 2, 3], "keep"), atol=1e-5)
    # one colour scale per image, that of the CAM with every neuron: an intervention fades the
    # map instead of being rescaled away
    lim = float(np.abs(a.cam).max())
    assert tuple(cam.contrast_limits) == pytest.approx((-lim, lim), rel=1e-5)
    # hidden, it is not refreshed (no canvas or layer-list repaint per slider step); shown, it is
    # refreshed once with the latest map
    calls = []
    refresh = cam.refresh

    def counting_refresh(*args, **kw):
        calls.append(kw)
        return refresh(*args, **kw)

    cam.refresh = counting_refresh
    iw.custom.value = "0, 2-3"
    iw.recompute()
    assert calls == []
    cam.visible = True
    assert calls and calls[-1].get("thumbnail", True)
    calls.clear()
    # visible, a step re-uploads the texture straight to the vispy visual (a napari refresh would
    # also repaint the layer list) and the thumbnail follows once the slider rests
    visual = viewer.window._qt_viewer.canvas.layer_to_visual[cam]
    uploads = []
    on_data_change = visual._on_data_change
    visual._on_data_change = lambda: (uploads.append(1), on_data_change())
    iw.custom.value = "1"
    iw.recompute()
    assert uploads == [1] and calls == []
    qtbot.waitUntil(lambda: len(calls) == 1, timeout=5_000)
    assert calls[0].get("thumbnail", True) and calls[0]["data_displayed"] is False
    del visual._on_data_change
    del cam.refresh
    np.testing.assert_allclose(cam.data, a.reconstruction_cam([1], "keep"), atol=1e-5)
    assert tuple(cam.contrast_limits) == pytest.approx((-lim, lim), rel=1e-5)


def test_verdicts_survive_a_new_viewer_and_kappa_is_shown(
    viewer, exam, qtbot, make_napari_viewer, tmp_path
):
    from napari_mammo_sae._napari.widgets._common import get_session
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget
    from napari_mammo_sae.labels import LabelStore

    w = _explorer(viewer, exam, qtbot)
    lw = LabellingWidget(viewer)
    lw.db_path.value = str(tmp_path / "verdicts.sqlite")
    lw._db_changed()
    _run(w, qtbot)
    top = w.session.top_neurons
    assert lw.neuron.value == top[0]
    lw.rater.value = "ann"
    assert lw.record("clinical") is not None
    assert "saved" in lw.saved.text()
    # viewer key bindings: ']' moves on, '2' records spurious
    _press(viewer, "]")
    assert lw.neuron.value == top[1]
    _press(viewer, "2")
    lw.rater.value = "bob"
    lw.neuron.value = top[0]
    lw.record("clinical")
    lw.neuron.value = top[1]
    lw.record("clinical")
    assert "Cohen's kappa ann vs bob" in lw.agreement.text()
    sae_hash = w.session.sae_hash
    viewer.close()
    # a new viewer, a new widget, the same database: everything is there
    v2 = make_napari_viewer()
    get_session(v2).sae_hash = sae_hash
    lw2 = LabellingWidget(v2)
    lw2.db_path.value = str(tmp_path / "verdicts.sqlite")
    lw2._db_changed()
    lw2.neuron.value = top[1]
    assert lw2.history.count() == 2
    with LabelStore(tmp_path / "verdicts.sqlite") as store:
        assert store.verdict_of(sae_hash, top[1], "ann") == "spurious"
        kappa, n = store.cohen_kappa("ann", "bob", sae_hash)
    assert n == 2 and kappa == pytest.approx(0.0)
    assert lw2.export_csv(tmp_path / "v.csv") == 4


def test_no_rater_means_not_saved_and_a_notification(viewer, exam, qtbot):
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget

    lw = LabellingWidget(viewer)
    lw.session.sae_hash = "abc"
    lw.rater.value = ""
    assert lw.record("clinical") is None
    assert "NOT saved" in lw.saved.text()


def test_bad_inputs_notify_and_never_crash(make_napari_viewer, exam, tmp_path, monkeypatch, qtbot):
    from napari.utils.notifications import notification_manager

    from napari_mammo_sae._napari.model_choice import Source
    from napari_mammo_sae._napari.widgets import _common
    from napari_mammo_sae._napari.widgets.explorer import NeuronExplorer

    monkeypatch.setattr(_common, "settings_path", lambda: tmp_path / "settings.json")
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    viewer = make_napari_viewer()
    w = NeuronExplorer(viewer)
    w.on_open.value = False  # this is about Run with bad inputs, not the analysis on open
    assert w.run() is None  # no image layer
    viewer.open(str(next((exam / "data" / "images").iterdir())), plugin=PLUGIN)
    w.source.value = Source.files
    w.classifier_path.value = tmp_path / "missing"
    w.sae_path.value = exam / "sae"
    w.device.value = "cpu"
    worker = w.run()
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=60_000)
    assert worker is not None and "no classifier" in (w.last_error or "")
    notification_manager.notification_ready.disconnect(seen.append)
    assert any("open a DICOM" in str(n.message) for n in seen)


def test_boxes_from_a_vindr_csv_and_box_agreement(viewer, exam, qtbot):
    w = _explorer(viewer, exam, qtbot)
    n = w.load_boxes(exam / "data" / "finding_annotations.csv")
    assert n >= 1
    shapes = [lay for lay in viewer.layers if lay._type_string == "shapes"]
    assert shapes and "category" in shapes[-1].features
    w.all_views.value = True
    _run(w, qtbot)
    with_boxes = [r for r in w.session.results.values() if r.annotations]
    assert with_boxes, "the CSV's boxes reach the analysed images"
    for r in with_boxes:
        assert set(r.box_iou) == {int(x) for x in r.neurons}
        assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in r.box_iou.values())


def test_plots_draw_class_means_and_auc_curves(viewer, tmp_path):
    import json

    from napari_mammo_sae._napari.widgets._common import get_session
    from napari_mammo_sae._napari.widgets.plots import PlotsWidget
    from napari_mammo_sae.pipeline.probe import ProbeResult

    s = get_session(viewer)
    means = np.abs(np.random.default_rng(0).normal(size=(2, 64)))
    s.probe = ProbeResult("h", "calcification", means, np.array([30, 5]),
                          {"class_mean": means}, {}, {})  # fmt: skip
    report = tmp_path / "report"
    report.mkdir()
    rows = [{"variant": "finetuned", "concept": "calcification", "mode": m, "baseline": 0.9,
             "k": [0, 1, 10, "all"], "auroc": [0.5, 0.6, 0.8, 0.9]} for m in ("activated", "deactivated")]  # fmt: skip
    (report / "results.json").write_text(json.dumps({"figure2": rows}))
    pw = PlotsWidget(viewer)
    pw.report.value = report
    drawn = pw.draw()
    assert drawn == {"means": 2, "marked": 10, "curves": 2}


def test_widgets_from_the_plugin_menu_share_one_session(make_napari_viewer):
    """napari hands each plugin widget its own viewer proxy; the session must still be shared."""
    import gc

    from napari_mammo_sae._napari.widgets._common import get_session

    viewer = make_napari_viewer()
    dock_a, explorer = viewer.window.add_plugin_dock_widget("napari-mammo-sae", "Neuron explorer")
    _, labelling = viewer.window.add_plugin_dock_widget("napari-mammo-sae", "Neuron labelling")
    assert explorer.viewer is not labelling.viewer  # two proxies
    assert explorer.session is labelling.session is get_session(viewer)
    viewer.window.remove_dock_widget(dock_a)
    del explorer, dock_a
    gc.collect()
    assert labelling.session is get_session(viewer)


def test_closing_the_viewer_mid_run_exits_cleanly(exam, tmp_path):
    """A worker still running when the viewer closes must not abort the process at exit."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import napari
        from napari_mammo_sae._napari.widgets import _common
        from pathlib import Path
        _common.settings_path = lambda: Path({str(tmp_path / "s.json")!r})
        v = napari.Viewer(show=True)
        v.open({str(next((exam / "data" / "images").iterdir()))!r}, plugin="napari-mammo-sae")
        _, e = v.window.add_plugin_dock_widget("napari-mammo-sae", "Neuron explorer")
        from napari_mammo_sae._napari.model_choice import Source
        e.source.value = Source.files
        e.classifier_path.value = {str(exam / "clf")!r}
        e.sae_path.value = {str(exam / "sae")!r}
        e.all_views.value = True
        worker = e.run()
        assert worker is not None, e.last_error
        v.close()
        print("CLOSED", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CLOSED" in proc.stdout and "Aborted" not in proc.stderr


def test_gc_freeze_runs_once_and_can_be_turned_off(monkeypatch):
    import gc

    from napari_mammo_sae._napari.widgets import explorer

    monkeypatch.setattr(explorer, "_FROZEN", False)
    gc.unfreeze()
    monkeypatch.setenv("NAPARI_MAMMO_SAE_GC_FREEZE", "0")
    explorer.freeze_long_lived_objects()
    assert gc.get_freeze_count() == 0 and not explorer._FROZEN
    monkeypatch.delenv("NAPARI_MAMMO_SAE_GC_FREEZE")
    explorer.freeze_long_lived_objects()
    assert gc.get_freeze_count() > 1000 and explorer._FROZEN
    gc.unfreeze()
    explorer.freeze_long_lived_objects()  # once per process: not again
    assert gc.get_freeze_count() == 0


def test_overlay_batch_always_ends_even_when_a_layer_step_fails(viewer, exam, qtbot, monkeypatch):
    """The inserts run inside one layers batch; it must close on success and on failure, or
    napari would stop updating its scene graph."""
    canvas = viewer.window._qt_viewer.canvas
    window = viewer.window._qt_window
    w = _explorer(viewer, exam, qtbot, k=2)
    seen = []
    insert = type(w)._insert_layer

    controls = viewer.window._qt_viewer.controls
    no_controls_yet = []

    def recording_insert(self, layer):
        seen.append(holding(window))  # repaints are held while the overlays go in
        insert(self, layer)
        # napari's layer-controls panel is built in a step of its own, after the insert
        no_controls_yet.append(layer in viewer.layers and layer not in controls.widgets)

    # on the class: a magicgui Container treats instance attributes as its widgets
    monkeypatch.setattr(type(w), "_insert_layer", recording_insert)
    _run(w, qtbot)
    monkeypatch.undo()  # the recorder holds the window: drop it before napari's leak check
    # the shown neuron's layer, then (after the overlays are shown) the hidden rank's: each insert
    # with the window's repaints held
    assert seen == [True, True]
    assert no_controls_yet == [True, True]
    overlays = w._overlay_layers()
    assert len(overlays) == 2 and all(lay in controls.widgets for lay in overlays)
    viewer.layers.selection.active = overlays[0]  # selecting one shows its own panel
    assert controls.currentWidget() is controls.widgets[overlays[0]]
    assert not w._batching and not canvas._pause_scene_graph and not holding(window)
    w.remove_overlays()
    assert not any(lay in controls.widgets for lay in overlays)

    def broken(self, layer):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(w), "_insert_layer", broken)
    w.run()
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120_000)
    assert "could not show the overlays: boom" in (w.last_error or "")
    assert not w._batching and not canvas._pause_scene_graph and not holding(window)


def test_explorer_picker_follows_layers_status_names_runtime_and_export_seam(
    viewer, exam, qtbot, monkeypatch
):
    import sys
    import types

    from napari.utils.notifications import notification_manager

    w = _explorer(viewer, exam, qtbot, k=2)
    names = sorted(lay.name for lay in w.image.choices)
    assert names == ["L CC", "L MLO", "R CC", "R MLO"]
    viewer.layers.remove("L MLO")  # the picker follows the viewer's layers
    assert "L MLO" not in [lay.name for lay in w.image.choices]
    _run(w, qtbot)
    runtime = w.session.current.analysis.runtime
    assert runtime and f"({runtime} backbone)" in w.status.value
    # the export button opens the PACS dock's dialog for this viewer ...
    calls = []
    fake = types.ModuleType("napari_mammo_sae._napari.widgets.pacs")
    fake.export_analysis_dialog = calls.append
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    w.export_button.clicked.emit()
    assert calls == [w.viewer]
    # ... and says so clearly where that dock is not installed
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    monkeypatch.setitem(sys.modules, fake.__name__, None)
    w.export_button.clicked.emit()
    notification_manager.notification_ready.disconnect(seen.append)
    assert any("not available" in str(n.message) for n in seen)


def test_intervention_modes_spurious_labels_and_the_study_consensus(
    viewer, exam, qtbot, tmp_path, monkeypatch
):
    import threading

    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget, Mode
    from napari_mammo_sae.labels import LabelStore

    w = _explorer(viewer, exam, qtbot)
    iw = InterventionWidget(viewer)
    assert Mode.study_spurious not in iw.mode.choices  # no reading study open
    _run(w, qtbot)
    s = w.session
    # the CAM layer goes in over later event-loop turns (its timers hold the viewer until then)
    qtbot.waitUntil(lambda: f"{s.current_layer} · CAM (intervened)" in viewer.layers)
    s.label_db = tmp_path / "labels.sqlite"
    with LabelStore(s.label_db) as store:
        store.add(s.sae_hash, 7, "spurious", rater="ann")
    opened_on = []
    init = LabelStore.__init__

    def recording_init(self, *args, **kwargs):
        opened_on.append(threading.current_thread() is threading.main_thread())
        init(self, *args, **kwargs)

    monkeypatch.setattr(LabelStore, "__init__", recording_init)
    iw.mode.value = Mode.spurious
    assert iw.intervened.value == "reading the verdicts..."  # read in a worker, shown when there
    qtbot.waitUntil(lambda: iw.last is not None and list(iw.last.neurons) == [7], timeout=30_000)
    assert iw.neuron_set() == ([7], "remove")
    with LabelStore(s.label_db) as store:  # a new verdict: read again
        store.add(s.sae_hash, 9, "spurious", rater="ann")
    s.verdicts_changed.emit()
    qtbot.waitUntil(lambda: list(iw.last.neurons) == [7, 9], timeout=30_000)
    monkeypatch.undo()
    assert opened_on[0] is False and opened_on.count(False) == 2  # never on the GUI thread

    class Study:
        def consensus_spurious(self):
            return [12, 3, 12]

    s.study = Study()  # the labelling dock opens a study: the mode is offered
    assert Mode.study_spurious in iw.mode.choices
    iw.mode.value = Mode.study_spurious
    result = iw.recompute()
    assert iw.neuron_set() == ([3, 12], "remove") and list(result.neurons) == [3, 12]
    a = s.current.analysis
    assert result.probability == pytest.approx(
        a.intervention().apply([3, 12], "remove").probability
    )
    s.study = None
    assert Mode.study_spurious not in iw.mode.choices


def test_an_sae_at_stage3_reruns_the_rest_of_the_backbone_in_the_docks(viewer, exam, qtbot):
    """A chosen SAE folder trained at stage3: the explorer analyses at that layer's grid, and the
    interventions dock's probability is the re-run of the rest of the backbone (no closed form)."""
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget, Mode
    from napari_mammo_sae.models.backbone import rest_of_backbone
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.models.weights import save_weights

    sae = SparseAutoencoder(48, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    folder = exam / "sae-stage3"
    save_weights(folder, sae, {**sae.config(), "training": {"hook": "stage3"}})
    w = _explorer(viewer, exam, qtbot)
    w.sae_path.value = folder / "config.json"
    iw = InterventionWidget(viewer)
    _run(w, qtbot)
    a = w.session.current.analysis
    assert a.hook == "stage3" and a.grid == (12, 8) and not a.closed_form
    assert "stage3" in w.status.value and "re-run" in w.status.value
    # the neuron overlays sit on the stage-3 grid
    maps = [lay for lay in viewer.layers
            if (lay.metadata.get("mammo_sae") or {}).get("kind") == "neuron"]  # fmt: skip
    assert maps and all(lay.data.shape == (12, 8) for lay in maps)
    iw.mode.value = Mode.custom_remove
    iw.custom.value = "0-7"
    result = iw.recompute()
    z = torch.as_tensor(a.latents.toarray())
    z[:, :8] = 0
    clf = w.session.models.analyzer.classifier
    with torch.no_grad():
        fmap = sae.decode(z).T.reshape(1, 48, 12, 8)
        logit = float(
            clf.head(rest_of_backbone(clf, fmap, "stage3").mean(dim=(2, 3))).reshape(-1)[0]
        )
    assert result.logit == pytest.approx(logit, abs=1e-4)
    assert "re-run" in iw.neurons_label.value
    np.testing.assert_allclose(iw.cam(a, list(range(8)), "remove"),
                               a.reconstruction_cam(list(range(8)), "remove"), atol=1e-6)  # fmt: skip
    # a region: every latent off under the boxes of the selected Shapes layer, re-run
    iw.mode.value = Mode.region
    assert "select the Shapes layer" in (iw.recompute() or iw.intervened.value)
    assert w.session.last_intervention is None  # nothing shown: nothing for the DICOM export
    cur = w.session.current
    r0, c0, r1, c1 = a.geometry.feature_cell_box(a.grid, 4, 3)  # one cell, original pixels
    inner = np.array([[r0 + 1, c0 + 1], [r1 - 1, c1 - 1]], dtype=float)
    corners = cur.placement.edge_to_world(inner)
    region = viewer.add_shapes([corners], shape_type="rectangle", name="region")
    result = iw.recompute()
    cells = np.zeros(a.grid, bool)
    cells[4, 3] = True
    assert result.mode == "region"
    assert result.logit == pytest.approx(a.region_intervention(cells).logit, abs=1e-6)
    assert "1 of 96 feature cells" in iw.neurons_label.value
    # the reader moves the box: the dock follows without another click
    r0, c0, r1, c1 = a.geometry.feature_cell_box(a.grid, 7, 5)
    inner = np.array([[r0 + 1, c0 + 1], [r1 - 1, c1 - 1]], dtype=float)
    region.data = [cur.placement.edge_to_world(inner)]
    moved = np.zeros(a.grid, bool)
    moved[7, 5] = True
    assert iw.last.logit == pytest.approx(a.region_intervention(moved).logit, abs=1e-6)
    assert iw.last.logit != pytest.approx(result.logit, abs=1e-9)
    # what the PACS dock's export will record: this result, its image and the moved box
    s = w.session
    assert s.last_intervention is iw.last and s.last_intervention_layer == cur.layer_name
    (box,), n_cells = s.last_intervention_region
    assert n_cells == 1 and box == pytest.approx((c0 + 1, r0 + 1, c1 - 1, r1 - 1), abs=1e-3)


def test_overlays_are_shown_before_the_hidden_ranks_layers_go_in(viewer, exam, qtbot, monkeypatch):
    """The reader gets the top neuron's layer, texts and table first; the other ranks' hidden
    layers follow one per turn, and a neuron chosen meanwhile is visible when its layer arrives.
    No napari progress bar runs meanwhile (its spinner recomposites the window every frame)."""
    from napari.utils import progress

    w = _explorer(viewer, exam, qtbot, k=4)
    state: dict = {"bars": []}
    mark = type(w)._mark_shown

    def at_shown(self) -> None:
        mark(self)
        state["layers"] = len(self._overlay_layers())
        state["table"] = self.table.shape[0]
        state["pending"] = len(self._pending)
        # the reader picks rank 3 before its layer is in
        self.session.set_neuron(int(self.session.current.neurons[2]))

    # on the class: a magicgui Container treats instance attributes as its widgets
    monkeypatch.setattr(type(w), "_mark_shown", at_shown)
    w.shown_at = None
    worker = w.run()
    assert worker is not None, w.last_error
    worker.yielded.connect(lambda _text: state["bars"].append(len(progress._all_instances)))
    qtbot.waitUntil(lambda: not w.is_busy(), timeout=120_000)
    monkeypatch.undo()
    assert w.last_error is None and w.shown_at is not None, w.last_error
    assert state["layers"] == 1 and state["table"] == 4 and state["pending"] > 0
    assert state["bars"] and set(state["bars"]) == {0}  # no napari progress bar during the run
    layers = w._overlay_layers()
    assert len(layers) == 4
    neurons = [int(n) for n in w.session.current.neurons]
    visible = [lay.metadata["mammo_sae"]["neuron"] for lay in layers if lay.visible]
    assert visible == [neurons[2]]  # the chosen one, inserted after the choice
    assert not w._batching and not holding(viewer.window._qt_window)


def test_interleaved_batches_hold_the_window_until_the_last_release(viewer, qtbot):
    """The explorer's hidden-layer inserts and the interventions' CAM insert interleave: one's
    release must not let the window repaint inside the other's insert. What changed meanwhile is
    painted at the last release, once, and only that: a widget that did not change is not."""
    from qtpy.QtCore import QEvent, QObject
    from qtpy.QtWidgets import QLabel

    from napari_mammo_sae._napari.inserts import QuietBatch

    window = viewer.window._qt_window
    changed, untouched = QLabel("before"), QLabel("never changes")
    viewer.window.add_dock_widget(changed, name="changed", area="right")
    viewer.window.add_dock_widget(untouched, name="untouched", area="left")
    viewer.window.show()
    qtbot.waitUntil(lambda: changed.isVisible() and untouched.isVisible())
    painted: list[tuple[str, str]] = []

    class Paints(QObject):
        def eventFilter(self, obj, event):  # noqa: N802 - Qt's name
            if event.type() == QEvent.Type.Paint:
                painted.append((obj.text(), "changed" if obj is changed else "untouched"))
            return False

    paints = Paints()
    for label in (changed, untouched):
        label.installEventFilter(paints)
    qtbot.wait(100)  # the first paints of the new docks are done
    first, second = QuietBatch(viewer), QuietBatch(viewer)
    first.begin()
    second.begin()
    painted.clear()
    changed.setText("during the batch")
    changed.repaint()  # even a forced repaint waits
    qtbot.wait(50)
    assert holding(window) and painted == []
    first.end()
    first.release()
    qtbot.wait(50)
    assert holding(window) and painted == []  # the second still holds it
    first.release()  # a repeated release changes nothing
    assert holding(window)
    second.end()
    second.release()
    assert not holding(window)
    qtbot.waitUntil(lambda: bool(painted), timeout=5_000)
    qtbot.wait(50)
    assert painted == [("during the batch", "changed")]  # kept, not lost; painted once
    for label in (changed, untouched):
        label.removeEventFilter(paints)


def test_analyse_on_open_takes_the_views_as_the_reader_adds_them(viewer, exam, qtbot, monkeypatch):
    """With *analyse on open* the first view of an exam starts a run and the views napari adds
    while it runs join that run's queue: one run, every view analysed, no Run click."""
    import threading

    from napari_mammo_sae.models.inference import Analyzer

    w = _explorer(viewer, exam, qtbot, k=2)
    assert w.on_open.value is True  # on by default: the overlays come with the exam, as CAD's do
    w.on_open.value = False
    viewer.layers.clear()
    files = sorted(next((exam / "data" / "images").iterdir()).glob("*.dicom"))
    assert len(files) == 4
    viewer.open(str(files[0]), plugin=PLUGIN)  # the option is off: nothing runs
    qtbot.wait(50)
    assert w.worker is None and not w.session.results
    from napari_mammo_sae._napari.widgets import _common

    assert _common.load_settings()["analyse_on_open"] is False  # remembered off
    w.on_open.value = True
    viewer.layers.clear()
    release = threading.Event()
    analyse = Analyzer.analyse
    runs = []

    def held(self, record, *args, **kwargs):  # the first view waits until the others are open
        release.wait(30)
        return analyse(self, record, *args, **kwargs)

    monkeypatch.setattr(Analyzer, "analyse", held)
    done = type(w)._done
    monkeypatch.setattr(type(w), "_done", lambda self, value: (runs.append(1), done(self, value)))
    viewer.open(str(files[0]), plugin=PLUGIN)
    qtbot.waitUntil(lambda: w.worker is not None, timeout=10_000)
    viewer.open([str(f) for f in files[1:]], plugin=PLUGIN)
    assert len(w._queue) == 4  # the running analysis took the three later views
    worker = w.worker
    assert w.run() is None and w.worker is worker  # no second run beside it
    assert "analysis is running" in w.status.value
    release.set()
    qtbot.waitUntil(lambda: not w.is_busy() and not w._open_scheduled, timeout=120_000)
    assert _common.load_settings()["analyse_on_open"] is True  # remembered
    monkeypatch.setattr(Analyzer, "analyse", analyse)
    assert w.last_error is None, w.last_error
    names = [lay.name for lay in viewer.layers if "record" in lay.metadata]
    assert sorted(w.session.results) == sorted(names) and len(runs) == 1
    assert {lay.metadata["mammo_sae"]["image"] for lay in w._overlay_layers()} == set(names)


def test_the_verdict_database_is_first_opened_by_the_worker_not_the_gui_thread(
    viewer, exam, qtbot, monkeypatch
):
    """Its first open (imports, schema check: 270 ms) once landed on the GUI thread with the
    table; the worker opens it after the analysis, even when no database was chosen (default)."""
    import threading

    from napari_mammo_sae.labels import store

    w = _explorer(viewer, exam, qtbot, k=2)
    assert w.session.label_db is None  # no labelling dock: the default database
    opened = []
    init = store.LabelStore.__init__

    def recording_init(self, *args, **kwargs):
        opened.append(threading.current_thread() is threading.main_thread())
        init(self, *args, **kwargs)

    monkeypatch.setattr(store.LabelStore, "__init__", recording_init)
    _run(w, qtbot)
    monkeypatch.undo()
    assert opened and opened[0] is False  # the first open: in the worker thread
