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
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [128, 80]}
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
