"""SAEs beyond the last layer: ``extract --hook`` stores a named backbone layer and says which."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mammo_sae.cli import main

SIZE = "128x80"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model

    root = tmp_path_factory.mktemp("hooks")
    data = root / "data"
    assert main(["phantom", "--out", str(data), "--studies", "1", "--seed", "3", "--size",
                 "small", "--workers", "1", "--quiet"]) == 0  # fmt: skip
    torch.manual_seed(0)
    weights = root / "clf"
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [128, 80],
              "concept": "calcification"}  # fmt: skip
    save_model(weights, build_classifier("test_efficientnet"), config)
    return data, weights


def _extract(setup, out, *extra):
    data, weights = setup
    return main(["extract", "--data", str(data), "--weights", str(weights), "--out", str(out),
                 "--workers", "0", "--device", "cpu", "--runtime", "torch", "--input-size", SIZE,
                 *extra])  # fmt: skip


def test_extract_at_stage3_stores_that_layer_and_names_it(setup, tmp_path):
    from napari_mammo_sae.dicom import read_mammogram
    from napari_mammo_sae.models.backbone import features_at, hook_grid
    from napari_mammo_sae.models.folders import load_classifier
    from napari_mammo_sae.pipeline.dataset import preprocess_record
    from napari_mammo_sae.pipeline.probe import open_view

    data, weights = setup
    assert _extract(setup, tmp_path / "s3.h5", "--hook", "stage3", "--dtype", "fp32") == 0
    view = open_view(tmp_path / "s3.h5")
    model, _ = load_classifier(weights)
    model.eval()
    # the stride-16 stage: 48 channels on an 8 x 5 grid at 128 x 80 (the head's is 4 x 3)
    assert view.hook == "stage3" and view.meta["hook"] == "stage3"
    assert view.grid == hook_grid(model, "stage3", (128, 80)) == (8, 5) and view.feature_dim == 48
    row = 0
    image_id = str(view.index.image_id[row])
    path = next(data.rglob(f"{image_id}.dicom"))
    image, _ = preprocess_record(read_mammogram(path), "mammoclip", (128, 80))
    with torch.inference_mode():
        ref = features_at(model, torch.from_numpy(image)[None], "stage3")[0].numpy()
    np.testing.assert_allclose(view.feature_map(row), ref, rtol=1e-4, atol=1e-4)
    view.close()
    assert _extract(setup, tmp_path / "head.h5") == 0  # the default stays the last layer
    head = open_view(tmp_path / "head.h5")
    assert head.hook == "head" and head.grid == (4, 3) and head.feature_dim == 256
    head.close()


def test_unknown_hook_exits_2_and_writes_nothing(setup, tmp_path, capsys):
    assert _extract(setup, tmp_path / "x.h5", "--hook", "stage9") == 2
    assert "unknown hook point 'stage9'" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_shortcuts_command_reports_every_cue_at_every_layer(tmp_path):
    """phantom with cues -> extract at head and stage3 -> an SAE per layer -> `shortcuts`: one
    row per cue and layer, the layer read from the store, the same k everywhere."""
    import csv

    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.models.weights import save_weights
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model

    data = tmp_path / "data"
    assert main(["phantom", "--out", str(data), "--studies", "3", "--seed", "5", "--size",
                 "small", "--workers", "1", "--quiet", "--balanced", "--cue", "clip:1,0,0.5",
                 "--cue", "site"]) == 0  # fmt: skip
    torch.manual_seed(0)
    weights = tmp_path / "clf"
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [128, 80],
              "concept": "calcification"}  # fmt: skip
    save_model(weights, build_classifier("test_efficientnet"), config)
    runs = []
    for hook, channels in (("head", 256), ("stage3", 48)):
        store = tmp_path / f"{hook}.h5"
        assert main(["extract", "--data", str(data), "--weights", str(weights), "--out",
                     str(store), "--workers", "0", "--device", "cpu", "--runtime", "torch",
                     "--input-size", SIZE, "--hook", hook]) == 0  # fmt: skip
        sae = SparseAutoencoder(channels, 32, "relu", generator=torch.Generator().manual_seed(2))
        save_weights(tmp_path / f"sae-{hook}", sae, sae.config())
        runs += ["--run", str(store), str(tmp_path / f"sae-{hook}"), str(weights)]
    out = tmp_path / "evaluation" / "shortcuts.csv"
    assert main(["shortcuts", "--data", str(data), *runs, "--out", str(out), "--k", "5",
                 "--quiet"]) == 0  # fmt: skip
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["cue"], r["layer"]) for r in rows) == [
        ("clip", "head"), ("clip", "stage3"), ("marker", "head"), ("marker", "stage3"),
        ("site", "head"), ("site", "stage3"),
    ]  # fmt: skip
    assert {r["concept"] for r in rows} == {"calcification"} and {r["k"] for r in rows} == {"5"}
    for r in rows:
        assert r["isolated"] in ("true", "false") and 0.0 <= float(r["best_cue_share"]) <= 1.0
    # an SAE of another layer is refused with a message that says what to pass
    bad = ["--run", str(tmp_path / "stage3.h5"), str(tmp_path / "sae-head"), str(weights)]
    assert main(["shortcuts", "--data", str(data), *bad, "--out", str(out), "--quiet"]) == 2


def test_an_sae_trained_on_a_stage3_store_records_the_layer(setup, tmp_path, capsys):
    import json

    assert _extract(setup, tmp_path / "s3.h5", "--hook", "stage3") == 0
    run = tmp_path / "sae"
    assert main(["train", "--store", str(tmp_path / "s3.h5"), "--out", str(run), "--kind", "relu",
                 "--d-latent", "16", "--batch-size", "64", "--epochs", "1", "--device", "cpu",
                 "--seed", "1", "--quiet"]) == 0  # fmt: skip
    config = json.loads(next(run.rglob("config.json")).read_text())
    assert config["training"]["hook"] == "stage3" and config["d_in"] == 48
    # the shortcut report refuses to read a head store with it
    data, weights = setup
    assert _extract(setup, tmp_path / "head.h5") == 0
    sae_dir = next(run.rglob("model.safetensors")).parent
    capsys.readouterr()
    assert main(["shortcuts", "--data", str(data), "--run", str(tmp_path / "head.h5"),
                 str(sae_dir), str(weights), "--out", str(tmp_path / "s.csv"), "--quiet"]) == 2  # fmt: skip
    assert "was trained at stage3" in capsys.readouterr().err
