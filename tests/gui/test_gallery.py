"""The neuron gallery on a real probe result: crops, heatmaps on the right cells, click to open."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A phantom dataset, tiny classifier + SAE, their feature store and probe file."""
    from napari_mammo_sae.models.backbone import create_backbone
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.models.weights import save_weights
    from napari_mammo_sae.phantom.dataset import PhantomConfig, write_dataset
    from napari_mammo_sae.pipeline.extract import extract_features
    from napari_mammo_sae.pipeline.probe import run_probe, save_probe

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gallery")
    cfg = PhantomConfig(studies=4, seed=5, height=384, width=320, spacing_mm=0.7,
                        mass_rate=0.5, calc_rate=0.5)  # fmt: skip
    write_dataset(cfg, root / "data", workers=1)
    torch.manual_seed(0)
    clf = ConceptClassifier(create_backbone("test_efficientnet")).eval()
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [192, 128],
              "preprocess": "mammoclip"}  # fmt: skip
    save_weights(root / "clf", clf, config)
    sae = SparseAutoencoder(256, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # latents fire on random features
    save_weights(root / "sae", sae, sae.config())
    extract_features(root / "data", clf, root / "store.h5", config=config,
                     input_size=(192, 128), workers=0, dtype="float32")  # fmt: skip
    result = run_probe(root / "store.h5", root / "sae", "calcification", top_k=3, n_images=6)
    save_probe(result, root / "probes" / "calc.npz")
    return root, result


@pytest.fixture
def viewer(make_napari_viewer, tmp_path, monkeypatch):
    from napari_mammo_sae._napari.widgets import _common

    monkeypatch.setattr(_common, "settings_path", lambda: tmp_path / "settings.json")
    return make_napari_viewer()


def _with_explorer_models(viewer, root):
    """Fill the review session as the explorer does after a run."""
    from napari_mammo_sae._napari.model_choice import ModelChoice, load_models
    from napari_mammo_sae._napari.widgets._common import get_session

    models = load_models(ModelChoice(root / "clf", root / "sae", root / "probes" / "calc.npz",
                                     device="cpu"))  # fmt: skip
    s = get_session(viewer)
    s.models, s.sae_hash, s.probe, s.concept = (
        models,
        models.sae_hash,
        models.probe,
        "calcification",
    )
    assert s.probe is not None, "the probe file belongs to this SAE"
    return s


def _gallery(viewer, root, store=True):
    from napari_mammo_sae._napari.widgets.gallery import NeuronGallery

    g = NeuronGallery(viewer)
    g.data_dir.value = root / "data"
    g.store_path.value = root / "store.h5" if store else None
    return g


def _load(g, qtbot):
    worker = g.load()
    assert worker is not None, g.last_error
    qtbot.waitUntil(lambda: g.worker is None, timeout=120_000)
    assert g.last_error is None, g.last_error
    return g.tiles


def _neuron(result):
    return next(n for n in result.top(1, "class_mean", 3) if result.top_images[n])


@pytest.mark.parametrize("store", [True, False], ids=["from-store", "from-model"])
def test_tiles_show_the_neurons_map_around_its_strongest_cell(
    viewer, probed, qtbot, store, monkeypatch
):
    from napari_mammo_sae.dicom import read_mammogram

    root, result = probed
    s = _with_explorer_models(viewer, root)
    neuron = _neuron(result)
    g = _gallery(viewer, root, store=store)
    s.set_neuron(neuron)
    assert g.neuron.value == neuron
    g.count.value = 4
    analyzer = s.models.analyzer
    calls = []
    original = analyzer.analyse
    monkeypatch.setattr(analyzer, "analyse", lambda *a, **k: calls.append(1) or original(*a, **k))
    tiles = _load(g, qtbot)
    assert bool(calls) is not store  # with the store: the SAE on stored maps, no backbone run
    monkeypatch.setattr(analyzer, "analyse", original)
    tops = result.top_images[neuron][:4]
    assert [t.image_id for t in tiles] == [t.image_id for t in tops]
    for tile, top in zip(tiles, tops, strict=True):
        expected = analyzer.analyse(read_mammogram(tile.path)).latent_maps([neuron])[0]
        np.testing.assert_allclose(tile.heat, expected, rtol=1e-3, atol=1e-4)
        assert np.unravel_index(np.argmax(tile.heat), tile.heat.shape) == tuple(top.cell)
        r0, c0, r1, c1 = tile.cell_box
        assert (r0, c0, r1, c1) == tile.geometry.feature_cell_box(tile.heat.shape, *top.cell)
        y0, x0, y1, x1 = tile.crop_box
        assert y0 <= r0 < r1 <= y1 + 1 and x0 <= c0 < c1 <= x1 + 1  # the cell is in the crop
        assert tile.crop.shape == (-(-(y1 - y0) // tile.step), -(-(x1 - x0) // tile.step))
    assert len(g.figure.axes) == len(tiles)
    assert f"neuron {neuron}: {len(tiles)} images" in g.status.value


def test_clicking_a_crop_opens_the_image_with_the_overlay_on_the_cell(viewer, probed, qtbot):
    root, result = probed
    s = _with_explorer_models(viewer, root)
    neuron = _neuron(result)
    g = _gallery(viewer, root)
    s.set_neuron(neuron)
    tile = _load(g, qtbot)[0]
    layers = g.open_tile(0)
    image, overlay = layers[0], layers[-1]
    assert image.metadata["record"].sop_instance_uid == tile.sop_instance_uid
    assert overlay.data.shape == tile.heat.shape  # on the feature grid, never upsampled
    # the centre of the strongest cell lands on that cell's centre in the image, in world mm
    i, j = tile.cell
    r0, c0, r1, c1 = tile.cell_box
    placement = image.metadata["placement"]
    want = placement.edge_to_world(np.array([[(r0 + r1) / 2, (c0 + c1) / 2]]))[0]
    got = np.asarray(overlay.translate) + np.asarray(overlay.scale) * np.array([i, j])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], want, atol=1e-6)  # view on the cell


def test_standalone_with_probe_file_and_store_only(viewer, probed, qtbot):
    root, result = probed
    neuron = _neuron(result)
    g = _gallery(viewer, root)
    g.probe_path.value = root / "probes" / "calc.npz"
    g.neuron.value = neuron
    tiles = _load(g, qtbot)  # no explorer: crops with the strongest cell, no heatmap
    assert len(tiles) == min(12, len(result.top_images[neuron]))
    assert all(t.heat is None for t in tiles)
    assert len(g.figure.axes) == len(tiles)


def test_refusals_are_explained_not_raised(viewer, probed, qtbot):
    root, result = probed
    g = _gallery(viewer, root, store=False)
    assert g.load() is None and "no probe result" in g.status.value
    g.probe_path.value = root / "probes" / "calc.npz"
    missing = max(result.top_images) + 1000
    g.neuron.value = missing
    assert g.load() is None and f"neuron {missing} is not among them" in g.status.value
    g.neuron.value = _neuron(result)
    assert g.load() is None and "run the neuron explorer" in g.status.value
    g.data_dir.value = root / "nowhere"
    assert g.load() is None and "choose the dataset folder" in g.status.value
    g.probe_path.value = root / "data"  # a folder without probes, and no SAE known
    assert g.load() is None and "probe" in g.status.value
