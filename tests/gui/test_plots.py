"""The plots dock draws the class means (Figure 4) and AUROC-vs-k (Figure 2) it is given."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui

M = 64


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch):
    from napari_mammo_sae._napari.widgets import _common

    monkeypatch.setattr(_common, "settings_path", lambda: tmp_path / "settings.json")
    return make_napari_viewer()


def _probe(seed=0):
    from napari_mammo_sae.pipeline.probe import ProbeResult, rank_scores

    rng = np.random.default_rng(seed)
    means = np.abs(rng.normal(size=(2, M)))
    means[1, 17] = 9.0  # a dominant class-1 neuron
    cm = type("CM", (), {"mean": means, "count": np.array([30, 5]), "overall": means.mean(0)})
    return ProbeResult("h" * 64, "calcification", means, np.array([30, 5]),
                       rank_scores(cm, None, None), {}, {}, {"split": "training"})  # fmt: skip


def _report(folder, means=None):
    from napari_mammo_sae.pipeline.report import write_report

    rows = [
        {"variant": v, "concept": "calcification", "mode": mode, "baseline": 0.9,
         "k": [0, 1, 10, "all"], "union_size": [0, 2, 17, M], "auroc": au,
         "auroc_ci": [[a - 0.05, a + 0.05] for a in au]}
        for v in ("finetuned", "pretrained")
        for mode, au in (("activated", [0.5, 0.7, 0.85, 0.9]), ("deactivated", [0.9, 0.8, 0.6, 0.5]))
    ]  # fmt: skip
    results = {"meta": {"what": "test"}, "figure2": rows}
    arrays = {}
    if means is not None:
        results["figure4"] = [{"variant": "finetuned", "concept": "calcification",
                               "top_neurons": [17], "mean_positive": "pos", "mean_negative": "neg"}]  # fmt: skip
        arrays = {"pos": means[1], "neg": means[0]}
    write_report(results, folder, arrays)
    return folder


def test_class_means_with_top_neurons_marked_and_auc_curves(viewer, tmp_path):
    from napari_mammo_sae._napari.widgets._common import get_session
    from napari_mammo_sae._napari.widgets.plots import PlotsWidget

    s = get_session(viewer)
    s.probe, s.variant, s.concept = _probe(), "pretrained", "calcification"
    pw = PlotsWidget(viewer)
    assert pw.draw() == {"means": 2, "marked": 10, "curves": 0}
    pw.report.value = _report(tmp_path / "report")
    assert pw.draw() == {"means": 2, "marked": 10, "curves": 2}
    means_ax, auc_ax = pw.figure.axes
    lines = [ln for ln in means_ax.get_lines() if ln.get_visible()]
    np.testing.assert_allclose(lines[0].get_ydata(), s.probe.class_means[0])
    np.testing.assert_allclose(lines[1].get_ydata(), s.probe.class_means[1])
    marked = means_ax.collections[0].get_offsets()[:, 0].astype(int)
    assert list(marked) == list(np.argsort(-s.probe.class_means[1], kind="stable")[:10])
    assert marked[0] == 17
    labels = [t.get_text() for t in means_ax.texts]
    assert labels == [str(n) for n in sorted(marked[:5])]  # the top 5, left to right
    # the session's model (pretrained) is the one whose curves are shown
    assert pw.curves.current_choice == "pretrained · calcification"
    pw.reset_choices()  # napari does this to a docked widget whenever layers change
    assert pw.curves.current_choice == "pretrained · calcification" and len(pw.curves.choices) == 2
    curves = [ln for ln in auc_ax.get_lines() if len(ln.get_xdata()) == 4]
    assert [list(c.get_ydata()) for c in curves] == [[0.5, 0.7, 0.85, 0.9], [0.9, 0.8, 0.6, 0.5]]
    assert list(curves[0].get_xdata()) == [0, 2, 17, M]
    pw.curves.value = pw.curves.choices[0]  # choosing another model redraws
    assert "finetuned" in auc_ax.figure.axes[1].get_title()


def test_current_neuron_marker_follows_the_session(viewer):
    from napari_mammo_sae._napari.widgets._common import get_session
    from napari_mammo_sae._napari.widgets.plots import PlotsWidget

    s = get_session(viewer)
    s.probe = _probe()
    pw = PlotsWidget(viewer)
    assert not pw._current_line.get_visible()
    s.set_neuron(23)
    assert pw._current_line.get_visible() and list(pw._current_line.get_xdata()) == [23, 23]
    s.set_neuron(M + 5)  # not a neuron of this SAE
    assert not pw._current_line.get_visible()


def test_standalone_probe_file_report_means_and_bad_files(viewer, tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_mammo_sae._napari.widgets.plots import PlotsWidget
    from napari_mammo_sae.pipeline.probe import save_probe

    probe = _probe(seed=3)
    path = save_probe(probe, tmp_path / "p.npz")
    pw = PlotsWidget(viewer)
    assert pw.draw() == {"means": 0, "marked": 0, "curves": 0}
    assert "no probe result" in pw.status.value
    pw.probe_path.value = path
    assert pw.draw()["means"] == 2
    np.testing.assert_allclose(pw.figure.axes[0].get_lines()[1].get_ydata(),
                               probe.class_means[1], rtol=1e-6)  # fmt: skip
    # no probe at all: the class means of an evaluation report (figure4 CSV)
    pw.probe_path.value = None
    pw.report.value = _report(tmp_path / "r", means=probe.class_means)
    assert pw.draw() == {"means": 2, "marked": 10, "curves": 2}
    np.testing.assert_allclose(pw.figure.axes[0].get_lines()[0].get_ydata(),
                               probe.class_means[0], rtol=1e-6)  # fmt: skip
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    (tmp_path / "bad.npz").write_bytes(b"not a probe")
    pw.probe_path.value = tmp_path / "bad.npz"
    assert pw.draw() == {"means": 0, "marked": 0, "curves": 0}
    notification_manager.notification_ready.disconnect(seen.append)
    assert "cannot draw" in pw.status.value and "not a probe file" in pw.status.value
    assert any("plots" in str(n.message) for n in seen)


def test_a_hidden_plots_dock_draws_when_shown(viewer, qtbot):
    """No matplotlib redraw on the GUI thread for a dock nobody sees; it catches up when shown."""
    from napari_mammo_sae._napari.widgets._common import get_session
    from napari_mammo_sae._napari.widgets.plots import PlotsWidget

    s = get_session(viewer)
    pw = PlotsWidget(viewer)
    qtbot.addWidget(pw.native)
    # drawn once at creation: nothing to show
    assert not pw.native.isVisible() and pw._means is None
    s.probe = _probe()
    s.analysis_changed.emit(s)
    assert pw._means is None  # hidden: not redrawn yet
    pw.native.show()
    qtbot.waitUntil(lambda: pw._means is not None, timeout=5000)
    np.testing.assert_allclose(pw._means, s.probe.class_means)
    s.set_neuron(7)  # visible now: the marker moves at once
    assert list(pw._current_line.get_xdata()) == [7, 7]
