"""The loop the tool exists for, on known truth and the bundled demo weights (issue 12).

On fresh phantom images of the bundled model's kind - the biopsy clip planted on images without
calcifications, calcifications on images without the clip - a radiologist's session with the
bundled finetuned calcification model and its stage-3 SAE:

1. the neuron that stands for the clip (largest cue share over these images; share > 0.5) shows
   on the clip in the viewer;
2. its gallery (a probe of these images) shows crops whose strongest cell is on the clip;
3. the labelling dock records "spurious" for it;
4. the interventions dock's "every neuron labelled spurious" mode switches it off (the rest of the
   backbone re-run) and the dock's probability is the core's re-run value; what that does to the
   shortcut must be what ``docs/evaluation/shortcuts.csv`` (``make weights``, the committed weights)
   reports for clip x calcification x stage3: if the row is isolated, the cue-only negative's
   probability drops and a real positive keeps its own; if not (the committed weights: the clip
   neuron carries almost none of the reliance, docs/EVALUATION.md), switching it off leaves both;
5. what does remove it: a box drawn around the clip (one 5 mm cell wider) and the dock's region
   mode - every latent under it off, the rest of the backbone re-run - brings the cue-only
   negative down by at least half its excess over clean negatives.

With ``MAMMO_SAE_SCREENSHOTS=<folder>`` the test also saves the viewer at step 4 as
``clinician_loop.png`` there (``make screenshots`` writes docs/images/).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

pytestmark = pytest.mark.gui

PLUGIN = "napari-mammo-sae"
ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "evaluation" / "shortcuts.csv"
#: what "removes the shortcut" and "keeps the finding" mean here (the report's own numbers are
#: over the whole test split; this is one image each)
MIN_DROP = 0.5  # the cue-only negative loses at least half of its probability above the clean level
MAX_POSITIVE_CHANGE = 0.05


def report_row(cue: str = "clip", concept: str = "calcification", layer: str = "stage3") -> dict:
    """The shortcut report's row for one cue, concept and layer."""
    with open(REPORT, newline="") as fh:
        rows = [r for r in csv.DictReader(fh)
                if (r["cue"], r["concept"], r["layer"]) == (cue, concept, layer)]  # fmt: skip
    assert len(rows) == 1, f"{REPORT} has no row for {cue} x {concept} x {layer}"
    return rows[0]


@pytest.fixture(scope="module")
def loop_data(tmp_path_factory):
    """Fresh phantom images (the bundled model's size), the cue only on images without the finding,
    a feature store of them at the row's layer and a probe with a gallery for every neuron."""
    from napari_mammo_sae.models.folders import load_model_folder
    from napari_mammo_sae.models.weights import bundled_weights_dir
    from napari_mammo_sae.phantom import SIZES
    from napari_mammo_sae.phantom.cues import parse_cue
    from napari_mammo_sae.phantom.dataset import PhantomConfig, write_dataset
    from napari_mammo_sae.pipeline.extract import extract_features
    from napari_mammo_sae.pipeline.probe import run_probe, save_probe

    torch.set_num_threads(2)
    row = report_row()
    weights = bundled_weights_dir()
    root = tmp_path_factory.mktemp("loop")
    h, w, sp = SIZES["medium"]
    cue, concept = row["cue"], row["concept"]
    # cue on every negative, never on a positive: the rates are (positive, negative, test)
    if cue == "marker":
        extra = {"confounder": True, "cue_concept": concept, "cue_pos_rate": 0.0,
                 "cue_neg_rate": 1.0, "cue_test_rate": 0.0}  # fmt: skip
    else:
        extra = {"confounder": False, "cues": (parse_cue(f"{cue}@{concept}:0,1,0"),)}
    rates = {"mass_rate": 0.5 if concept == "mass" else 0.0,
             "calc_rate": 0.5 if concept == "calcification" else 0.0}  # fmt: skip
    cfg = PhantomConfig(studies=3, seed=4242, height=h, width=w, spacing_mm=sp,
                        test_fraction=0.0, **rates, **extra)  # fmt: skip
    write_dataset(cfg, root / "data", workers=1)
    model_dir = weights / f"finetuned-{concept}"
    model, config = load_model_folder(model_dir)
    sae_dir = weights / (
        "sae-finetuned-calcification" if row["layer"] == "head"
        else f"sae-finetuned-{concept}-{row['layer']}"
    )  # fmt: skip
    extract_features(root / "data", model.eval(), root / "store.h5", config=config,
                     input_size=tuple(config["input_size"]), workers=0, dtype="float32",
                     hook=row["layer"], runtime="torch")  # fmt: skip
    result = run_probe(root / "store.h5", sae_dir, concept, top_k=10_000, n_images=4)
    save_probe(result, root / "probe.npz")
    return row, root, _cue_neuron(root, sae_dir, cue)


def _cue_neuron(root: Path, sae_dir: Path, cue: str) -> tuple[int, float]:
    """(neuron, share): the SAE neuron with the largest share of its activation mass on the cue's
    cells over these images (the report's cue share, over every neuron)."""
    from napari_mammo_sae.analysis.shortcuts import cue_cells, cue_shares
    from napari_mammo_sae.models.folders import load_sae
    from napari_mammo_sae.phantom.cues import load_cue_boxes
    from napari_mammo_sae.pipeline.store import open as open_store

    boxes = load_cue_boxes(root / "data")[cue]
    sae = load_sae(sae_dir).float().eval()
    view = open_store(root / "store.h5")
    grid = tuple(int(v) for v in view.grid)
    acts, masks = [], []
    with torch.inference_mode():
        for r in range(len(view.index.image_id)):
            image_id = str(view.index.image_id[r])
            acts.append(sae.encode(torch.as_tensor(view.tokens(r)).float()).numpy())
            masks.append(cue_cells(view.geometry(r), boxes.get(image_id), grid).reshape(-1))
    view.close()
    shares = cue_shares(acts, masks)
    best = int(np.argmax(shares))
    return best, float(shares[best])


def _images(root: Path, concept: str, cue: str):
    """(a cue-only negative, a positive without the cue): image paths and the cue's boxes."""
    from napari_mammo_sae.annotations import load_vindr
    from napari_mammo_sae.phantom.cues import load_cue_boxes

    vindr = load_vindr(root)
    boxes = load_cue_boxes(root)[cue]
    negative = positive = None
    for im in vindr.images.values():
        path = root / "images" / im.study_id / f"{im.image_id}.dicom"
        if im.has(concept) and not boxes.get(im.image_id) and positive is None:
            positive = path
        if not im.has(concept) and boxes.get(im.image_id) and negative is None:
            negative = (path, boxes[im.image_id])
    assert negative is not None and positive is not None, "the phantom needs one of each"
    return negative, positive


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch):
    from napari_mammo_sae._napari.widgets import _common

    monkeypatch.setattr(_common, "settings_path", lambda: tmp_path / "settings.json")
    monkeypatch.setattr("napari_mammo_sae.labels.default_path", lambda: tmp_path / "labels.sqlite")
    return make_napari_viewer()


def _run(explorer, qtbot):
    explorer.wait_idle(300)  # an image the reader just opened is being analysed on open
    worker = explorer.run()
    assert worker is not None, explorer.last_error
    qtbot.waitUntil(lambda: not explorer.is_busy(), timeout=300_000)
    assert explorer.last_error is None, explorer.last_error


def test_find_label_and_switch_off_a_shortcut_neuron(viewer, loop_data, qtbot, tmp_path):
    from napari_mammo_sae._napari.model_choice import Concept, Layer, Ranking, Source, Variant
    from napari_mammo_sae._napari.widgets.explorer import NeuronExplorer
    from napari_mammo_sae._napari.widgets.gallery import NeuronGallery
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget, Mode
    from napari_mammo_sae._napari.widgets.labelling import LabellingWidget
    from napari_mammo_sae.analysis.shortcuts import SHARE_THRESHOLD, cue_cells

    row, root, (shortcut, share) = loop_data
    concept, cue, layer = row["concept"], row["cue"], row["layer"]
    isolated = row["isolated"] == "true"
    (negative, _), positive = _images(root / "data", concept, cue)
    viewer.open(str(negative), plugin=PLUGIN)

    w = NeuronExplorer(viewer)
    w.source.value = Source.bundled
    w.concept.value = Concept[concept]
    w.variant.value = Variant.finetuned
    w.layer.value = Layer[layer]
    w.ranking.value = Ranking.logit
    w.k.value = int(row["k"])
    w.device.value = "cpu"
    iw = InterventionWidget(viewer)
    lw = LabellingWidget(viewer)
    lw.db_path.value = str(tmp_path / "labels.sqlite")
    lw._db_changed()
    lw.rater.value = "ann"
    g = NeuronGallery(viewer)
    g.data_dir.value = root / "data"
    g.probe_path.value = root / "probe.npz"
    g.store_path.value = root / "store.h5"
    # docked as a reader has them (and closed with the viewer)
    for widget, name in [(w, "neuron explorer"), (g, "gallery"), (lw, "labelling"),
                         (iw, "interventions")]:  # fmt: skip
        viewer.window.add_dock_widget(widget, name=name, area="right", tabify=widget is g)
    _run(w, qtbot)
    s = w.session
    a = s.current.analysis
    assert a.hook == layer and a.grid == (48, 30)

    # 1. a neuron stands for the clip; its gallery: crops whose strongest cell is on the cue
    assert share > SHARE_THRESHOLD, f"no neuron stands for the {cue} (best share {share:.2f})"
    s.set_neuron(shortcut)
    assert g.neuron.value == shortcut
    worker = g.load()
    assert worker is not None, g.last_error
    qtbot.waitUntil(lambda: g.worker is None, timeout=300_000)
    assert g.last_error is None and g.tiles
    cue_all = _cue_boxes_by_image(root / "data", cue)
    on_cue = []  # the crop's strongest cell on the clip's cells or next to them (a 5 mm cell)
    for tile in g.tiles:
        cells = cue_cells(tile.geometry, cue_all.get(tile.image_id), tile.heat.shape)
        near = ndimage.binary_dilation(cells, structure=np.ones((3, 3), bool))
        on_cue.append(bool(near[np.unravel_index(np.argmax(tile.heat), tile.heat.shape)]))
    # its strongest crop, and at least half of them, on the clip
    assert on_cue[0] and 2 * sum(on_cue) >= len(on_cue), f"on the {cue}: {on_cue}"

    # 2. the reader opens the gallery's top image (a negative with the clip): the neuron's map
    # there lies on the clip's box
    top = g.tiles[0]
    cue_boxes = cue_all[top.image_id]
    viewer.layers.clear()
    viewer.open(str(top.path), plugin=PLUGIN)
    image_layer = viewer.layers[0].name
    _run(w, qtbot)
    a = s.current.analysis
    mask = cue_cells(a.geometry, cue_boxes, a.grid).reshape(-1)
    heat = a.latent_maps([shortcut])[0].reshape(-1)
    assert heat.sum() > 0 and heat[mask].sum() / heat.sum() > SHARE_THRESHOLD

    # 3. the radiologist labels it spurious
    lw.neuron.value = shortcut
    assert lw.record("spurious") is not None

    # 4. switching off every neuron labelled spurious: the rest of the backbone re-run
    iw.mode.value = Mode.spurious  # the verdicts are read in a worker, then it recomputes
    qtbot.waitUntil(lambda: iw.last is not None and list(iw.last.neurons) == [shortcut])
    result = iw.last
    assert "re-run" in iw.neurons_label.value
    assert result.logit == pytest.approx(a.intervention().apply([shortcut], "remove").logit)
    before = result.reconstruction_probability
    clean = float(row["p_clean_negatives_before"])
    assert before > clean + 0.05, "the cue raises this negative's probability"
    if isolated:  # the shortcut goes: at least half of this image's excess over the clean level
        assert result.probability <= before - MIN_DROP * (before - clean)
    else:  # as the report says: the cue's neuron does not carry the reliance
        assert abs(result.probability - before) < MIN_DROP * (before - clean)

    # 5. what does remove it: the reader draws a box around the clip, one cell (5 mm) wider on
    # each side, and switches off everything under it (the rest of the backbone re-run)
    pad = 5.0 / a.geometry.spacing_mm[0]
    x0, y0, x1, y1 = np.asarray(cue_boxes, dtype=float).reshape(-1, 4).T
    box = np.array([[y0.min() - pad, x0.min() - pad], [y1.max() + pad, x1.max() + pad]])
    placement = viewer.layers[image_layer].metadata["placement"]
    truth = []  # the planted clip's truth box, shown (the region box is the reader's)
    for bx0, by0, bx1, by1 in cue_boxes:
        corners = np.array([[by0, bx0], [by0, bx1], [by1, bx1], [by1, bx0]], dtype=float)
        truth.append(placement.edge_to_world(corners))
    viewer.add_shapes(truth, shape_type="rectangle", edge_color="#00e5ff", face_color="transparent",
                      edge_width=0.5, name="planted cue (truth)", units=("mm", "mm"))  # fmt: skip
    viewer.add_shapes([placement.edge_to_world(box)], shape_type="rectangle",
                      name="region around the clip", edge_color="#ffffff",
                      face_color="transparent", units=("mm", "mm"))  # fmt: skip
    iw.mode.value = Mode.region
    region = iw.recompute()
    assert region is not None and region.mode == "region", iw.intervened.value
    print(
        f"clip image: P {before:.3f}, clip neuron off {result.probability:.3f}, "
        f"region off {region.probability:.3f}, clean negatives {clean:.3f}"
    )
    assert region.probability <= before - MIN_DROP * (before - clean)
    shot = os.environ.get("MAMMO_SAE_SCREENSHOTS")
    if shot:
        _screenshot(viewer, a, shortcut, image_layer,
                    Path(shot) / "clinician_loop.png", qtbot)  # fmt: skip
    iw.mode.value = Mode.spurious

    # ... and on a real positive (without the cue) the finding keeps its probability
    viewer.layers.clear()
    viewer.open(str(positive), plugin=PLUGIN)
    _run(w, qtbot)
    result = iw.recompute()
    assert list(result.neurons) == [shortcut]
    assert result.reconstruction_probability > 0.5, "the model finds this positive"
    assert abs(result.probability - result.reconstruction_probability) <= MAX_POSITIVE_CHANGE
    # the CAM layer goes in over later event-loop turns (its timers hold the viewer until then)
    qtbot.waitUntil(lambda: f"{s.current_layer} · CAM (intervened)" in viewer.layers)


def _cue_boxes_by_image(data: Path, cue: str) -> dict:
    from napari_mammo_sae.phantom.cues import load_cue_boxes

    return load_cue_boxes(data)[cue]


def _screenshot(viewer, a, neuron, image_layer, path: Path, qtbot) -> None:
    """The viewer as the radiologist sees it at step 4, zoomed on the clip: the neuron's map on the
    cue, the cue's box, the docks with the label and the intervened probability."""
    from napari_mammo_sae._napari import layers as L

    placement = viewer.layers[image_layer].metadata["placement"]
    tf = L.heatmap_transform(a.geometry, a.grid, placement)
    heat = a.latent_maps([neuron])[0]
    viewer.add_image(heat, name=f"{image_layer} · clip neuron n{neuron}", colormap=L.neuron_colormap(0),
                     blending="additive", contrast_limits=(0.0, float(heat.max()) or 1.0),
                     interpolation2d="linear", units=("mm", "mm"), **tf)  # fmt: skip
    rects = [np.asarray(d) for d in viewer.layers["planted cue (truth)"].data]
    for lay in viewer.layers:  # the image, the clip neuron and the truth box; the top-k hidden
        if (lay.metadata.get("mammo_sae") or {}).get("kind") == "neuron":
            lay.visible = False
    viewer.window.resize(1800, 1350)
    # the docks' forms scroll when squeezed: give the gallery its crops and the labelling its
    # status, as a reader drags the dock splitters
    from qtpy.QtCore import Qt

    docks = [viewer.window._dock_widgets[n] for n in ("gallery", "labelling", "interventions")]
    viewer.window._qt_window.resizeDocks(docks, [620, 330, 282], Qt.Orientation.Vertical)
    corners = np.concatenate(rects)
    viewer.scene.camera.center = tuple(corners.mean(axis=0))
    viewer.scene.camera.zoom = 1.0
    qtbot.wait(200)
    span = float(np.ptp(corners, axis=0).max())
    canvas = min(viewer.window._qt_viewer.canvas.size)
    viewer.scene.camera.zoom = canvas / max(12 * span, 40.0)  # about 40 mm around the clip
    qtbot.wait(500)
    path.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(path), canvas_only=False)
