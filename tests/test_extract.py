"""extract: a VinDr-layout folder -> feature store; resume skips stored images; a kill leaves it incomplete."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

BREAST_COLS = [
    "study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
    "breast_birads", "breast_density", "split",
]  # fmt: skip
FINDING_COLS = BREAST_COLS[:-1] + [
    "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split"
]  # fmt: skip


def _write_dicom(path: Path, pixels: np.ndarray, laterality: str, view: str) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MG"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM"
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_vindr_dataset(
    root: Path, studies: int = 3, shape: tuple[int, int] = (96, 64), seed: int = 0
) -> dict:
    """A tiny VinDr-Mammo-layout dataset: a bright blob per finding, a marker cue in some images.

    Study k's right CC image has a mass, its left MLO a calcification cluster; the last study is in
    the test split. Every third image carries the cue (confounder_annotations.csv).
    """
    rng = np.random.default_rng(seed)
    rows_b, rows_f, rows_c = [], [], []
    truth: dict = {"images": [], "boxes": {}}
    h, w = shape
    for s in range(studies):
        study = f"study{s:03d}"
        split = "test" if s == studies - 1 else "training"
        for v, (lat, view) in enumerate([("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]):
            image_id = f"img{s:03d}{v}"
            yy, xx = np.mgrid[0:h, 0:w]
            img = 600 + 80 * rng.random((h, w))
            breast = ((yy - h / 2) / (h / 2)) ** 2 + (xx / (w * 0.9)) ** 2 < 1
            img[breast] += 900
            findings = []
            if (lat, view) == ("R", "CC") and (s % 2 == 0 or split == "test"):
                findings.append(("Mass", (10.0, 30.0, 26.0, 46.0)))
            if (lat, view) == ("L", "MLO"):
                findings.append(("Suspicious Calcification", (20.0, 50.0, 32.0, 62.0)))
            for _, (x0, y0, x1, y1) in findings:
                img[int(y0) : int(y1), int(x0) : int(x1)] += 1500
            base = {
                "study_id": study, "series_id": f"ser{s}", "image_id": image_id,
                "laterality": lat, "view_position": view, "height": h, "width": w,
                "breast_birads": "BI-RADS 4" if findings else "BI-RADS 1",
                "breast_density": "DENSITY C" if v % 2 else "DENSITY B", "split": split,
            }  # fmt: skip
            rows_b.append(base)
            if findings:
                for cat, (x0, y0, x1, y1) in findings:
                    rows_f.append(
                        {**base, "finding_categories": str([cat]), "finding_birads": "BI-RADS 4",
                         "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}
                    )  # fmt: skip
            else:
                rows_f.append(
                    {**base, "finding_categories": "['No Finding']", "finding_birads": "",
                     "xmin": "", "ymin": "", "xmax": "", "ymax": ""}
                )  # fmt: skip
            if (s * 4 + v) % 3 == 0:
                img[2:8, w - 10 : w - 4] = 4000
                rows_c.append({"image_id": image_id, "study_id": study, "xmin": w - 10.0,
                               "ymin": 2.0, "xmax": w - 4.0, "ymax": 8.0})  # fmt: skip
            _write_dicom(
                root / "images" / study / f"{image_id}.dicom", np.clip(img, 0, 4095), lat, view
            )
            truth["images"].append(image_id)
            truth["boxes"][image_id] = findings
    for name, cols, rows in (
        ("breast-level_annotations.csv", BREAST_COLS, rows_b),
        ("finding_annotations.csv", FINDING_COLS, rows_f),
        (
            "confounder_annotations.csv",
            ["image_id", "study_id", "xmin", "ymin", "xmax", "ymax"],
            rows_c,
        ),
    ):
        with (root / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            writer.writerows(rows)
    return truth


# --- tests ---------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from napari_mammo_sae.cli import main  # noqa: E402
from napari_mammo_sae.errors import StoreError  # noqa: E402

SIZE = "128x80"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("vindr")
    truth = write_vindr_dataset(root, studies=3)
    return root, truth


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("w") / "clf"
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [128, 80]}
    save_model(folder, build_classifier("test_efficientnet"), config)
    return folder


def _extract(dataset, weights, out, *extra):
    return main(
        ["extract", "--data", str(dataset[0]), "--weights", str(weights), "--out", str(out),
         "--workers", "0", "--device", "cpu", "--input-size", SIZE, *extra]
    )  # fmt: skip


def test_extract_stores_every_image_with_its_index(dataset, weights, tmp_path):
    from napari_mammo_sae.models.folders import load_classifier as load_model
    from napari_mammo_sae.pipeline.probe import open_view

    root, truth = dataset
    assert _extract(dataset, weights, tmp_path / "s.h5") == 0
    view = open_view(tmp_path / "s.h5")
    assert sorted(view.index.image_id) == sorted(truth["images"])
    assert view.grid == (4, 3) and view.feature_dim == 256
    assert view.meta["feature_dtype"] == "float16"
    # the stored map is the model's own forward_features of the preprocessed image, in fp16
    model, _ = load_model(weights)
    row = int(np.nonzero(view.index.image_id == truth["images"][0])[0][0])
    from napari_mammo_sae.dicom import read_mammogram
    from napari_mammo_sae.pipeline.dataset import image_path, preprocess_record

    image_id = truth["images"][0]
    rec = read_mammogram(image_path(root, "study000", image_id))
    image, geometry = preprocess_record(rec, "mammoclip", (128, 80))
    with torch.inference_mode():
        ref = model.eval().forward_features(torch.from_numpy(image)[None])[0].numpy()
    np.testing.assert_allclose(view.feature_map(row), ref, rtol=2e-3, atol=2e-3)
    assert view.geometry(row) == geometry
    # labels of both concepts and the split, from the annotation files
    mass = dict(zip(view.index.image_id, view.labels("mass"), strict=True))
    calc = dict(zip(view.index.image_id, view.labels("calcification"), strict=True))
    for image_id, findings in truth["boxes"].items():
        cats = {c for c, _ in findings}
        assert mass[image_id] == int("Mass" in cats)
        assert calc[image_id] == int("Suspicious Calcification" in cats)
    assert set(view.index.split) == {"training", "test"}
    # no patient data in the index
    assert "PHANTOM" not in json.dumps({k: list(map(str, v)) for k, v in vars(view.index).items()})


def test_resume_skips_stored_images(dataset, weights, tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert _extract(dataset, weights, out, "--limit", "5") == 0
    capsys.readouterr()
    assert _extract(dataset, weights, out) == 0
    msg = capsys.readouterr().out
    assert "7 images stored" in msg and "5 already there" in msg
    from napari_mammo_sae.pipeline.probe import open_view

    view = open_view(out)
    assert len(view) == 12 and len(set(view.index.image_id)) == 12


KILL = """
import os, signal, sys
from pathlib import Path
from napari_mammo_sae.models.folders import load_classifier as load_model
from napari_mammo_sae.pipeline.extract import extract_features
model, config = load_model(sys.argv[2])
def boom(n):
    if n >= 4:
        os.kill(os.getpid(), signal.SIGKILL)
extract_features(sys.argv[1], model, Path(sys.argv[3]), config=config, input_size="128x80",
                 batch_size=2, on_batch=boom)
"""


def test_killed_extract_is_incomplete_and_resumes(dataset, weights, tmp_path, capsys):
    from napari_mammo_sae.pipeline.probe import open_view

    out = tmp_path / "s.h5"
    proc = subprocess.run(
        [sys.executable, "-c", KILL, str(dataset[0]), str(weights), str(out)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    with pytest.raises(StoreError, match="incomplete"):
        open_view(out)
    # every consumer refuses it with the store's exit code
    assert main(["probe", "--store", str(out), "--sae", str(tmp_path), "--concept", "mass",
                 "--out", str(tmp_path / "p.npz")]) == StoreError.exit_code  # fmt: skip
    capsys.readouterr()
    assert _extract(dataset, weights, out) == 0
    assert "4 already there" in capsys.readouterr().out
    assert len(open_view(out)) == 12


def test_errors_have_documented_exit_codes(dataset, weights, tmp_path):
    from napari_mammo_sae.errors import AnnotationError, ConfigError

    assert (
        _extract(dataset, weights, tmp_path / "a.h5", "--split", "validation")
        == ConfigError.exit_code
    )
    assert main(["extract", "--data", str(tmp_path / "nowhere"), "--weights", str(weights),
                 "--out", str(tmp_path / "b.h5")]) == AnnotationError.exit_code  # fmt: skip
    assert main(["probe", "--store", str(tmp_path / "missing.h5"), "--sae", str(tmp_path),
                 "--concept", "mass", "--out", str(tmp_path / "p.npz")]) == StoreError.exit_code  # fmt: skip
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert main(["probe", "--store", str(tmp_path / "junk.h5"), "--sae", str(tmp_path),
                 "--concept", "mass", "--out", str(tmp_path / "p.npz")]) == StoreError.exit_code  # fmt: skip
    # a store extracted by one backbone refuses to be extended by another
    out = tmp_path / "c.h5"
    assert _extract(dataset, weights, out, "--limit", "2") == 0
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model

    torch.manual_seed(1)
    other = tmp_path / "other"
    save_model(other, build_classifier("test_efficientnet"), {"kind": "classifier",
               "backbone": "test_efficientnet"})  # fmt: skip
    assert _extract(dataset, other, out) == StoreError.exit_code


def test_torchrun_shards_are_joined_by_an_index(dataset, weights, tmp_path):
    from napari_mammo_sae.models.folders import load_classifier as load_model
    from napari_mammo_sae.pipeline.extract import extract_features, shard_path
    from napari_mammo_sae.pipeline.probe import open_view

    model, config = load_model(weights)
    out = tmp_path / "s.h5"
    r0 = extract_features(dataset[0], model, out, config=config, input_size=SIZE, rank=0, world=2)
    assert r0.path == shard_path(out, 0, 2) and r0.stored == 6
    with pytest.raises(StoreError):
        open_view(out)  # rank 1 has not finished: no index yet
    extract_features(dataset[0], model, out, config=config, input_size=SIZE, rank=1, world=2)
    view = open_view(out)
    assert sorted(view.index.image_id) == sorted(dataset[1]["images"])
    single = tmp_path / "one.h5"
    res = extract_features(dataset[0], model, single, config=config, input_size=SIZE)
    # the steady-state rate leaves out the first batch (loader start-up, the first decode)
    assert res.steady[0] == res.stored - 1 and 0 < res.steady[1] < res.seconds
    assert res.steady_images_per_second > 0
    one = open_view(single)
    for row, image_id in enumerate(view.index.image_id):
        other = int(np.nonzero(one.index.image_id == image_id)[0][0])
        np.testing.assert_array_equal(view.feature_map(row), one.feature_map(other))
