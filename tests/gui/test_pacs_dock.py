"""The PACS dock in a real viewer against the test Orthanc: search, Open (background retrieve, hung
as an exam), Cancel, errors in the status line; and the explorer's export action."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
import torch

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory):
    """A phantom four-view study stored in Orthanc: (study UID, the files)."""
    from napari_mammo_sae.phantom.dataset import PhantomConfig, write_dataset

    root = tmp_path_factory.mktemp("dock-phantom")
    write_dataset(PhantomConfig(studies=1, seed=21, height=448, width=368, spacing_mm=0.6), root,
                  workers=1)  # fmt: skip
    files = sorted(root.rglob("*.dicom"))
    for f in files:
        orthanc.upload(f)
    return str(pydicom.dcmread(files[0]).StudyInstanceUID), files


@pytest.fixture()
def dock(make_napari_viewer, orthanc, monkeypatch, tmp_path):
    from napari_mammo_sae._napari.widgets.pacs import PacsDock

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    viewer = make_napari_viewer()
    w = PacsDock(viewer)
    viewer.window.add_dock_widget(w, name="PACS")
    w.url.value = orthanc.dicomweb
    return w


def _search(dock, qtbot, uid):
    dock.study.value = uid
    dock.search()
    qtbot.waitUntil(lambda: dock.search_button.enabled and dock.status.value != "searching...",
                    timeout=30_000)  # fmt: skip


def test_search_lists_the_study_without_patient_names(dock, study, qtbot):
    uid, files = study
    _search(dock, qtbot, uid)
    assert dock.status.value == "1 study with MG images"
    data = dock.table.data.to_list()
    assert data == [["2026-01-01", "-", 4, "RCC, LCC, RMLO, LMLO"]]
    assert dock.table.column_headers == ("date", "accession", "MG", "views")
    name = str(pydicom.dcmread(files[0]).PatientName)
    assert name not in str(data)


def test_open_retrieves_in_the_background_and_hangs_the_exam(dock, study, qtbot):
    uid, _ = study
    _search(dock, qtbot, uid)
    dock.open_selected()
    viewer = dock.viewer
    qtbot.waitUntil(lambda: dock.status.value.startswith("opened"), timeout=60_000)
    names = sorted(layer.name for layer in viewer.layers)
    assert names == ["L CC", "L MLO", "R CC", "R MLO"]
    x = {layer.name: layer.metadata["placement"].translate_mm[1] for layer in viewer.layers}
    assert x["R CC"] < x["L CC"] and x["R MLO"] < x["L MLO"]  # right breast on the left
    assert dock.progress.value == 4 and dock.status.value == "opened 4 views"
    assert all("PatientName" not in str(layer.metadata) for layer in viewer.layers)


def test_cancel_stops_between_images_and_keeps_them_cached(dock, study, qtbot, monkeypatch):
    from napari_mammo_sae.pacs import PacsClient

    original = PacsClient.retrieve_instance

    def slow(self, ref):
        time.sleep(0.4)
        return original(self, ref)

    monkeypatch.setattr(PacsClient, "retrieve_instance", slow)
    uid, _ = study
    _search(dock, qtbot, uid)
    dock.open_selected()
    qtbot.waitUntil(lambda: dock.progress.value >= 1, timeout=30_000)
    dock.cancel()
    qtbot.waitUntil(lambda: "cancelled" in dock.status.value, timeout=30_000)
    assert len(dock.viewer.layers) == 0
    from napari_mammo_sae.pacs.cache import InstanceCache

    cached = list(InstanceCache().root.rglob("*.dcm"))
    assert 1 <= len(cached) < 4 and InstanceCache().partials() == []


def test_unreachable_server_is_reported_in_the_status_line(dock, qtbot):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dock.url.value = f"http://127.0.0.1:{port}/dicom-web"
    dock.search()
    qtbot.waitUntil(lambda: dock.search_button.enabled, timeout=30_000)
    assert "cannot reach" in dock.status.value
    dock.url.value = "not a url"
    dock.search()
    assert "must look like" in dock.status.value


def test_export_action_writes_the_three_objects_of_each_analysed_image(
    make_napari_viewer, study, qtbot, tmp_path
):
    from napari_mammo_sae._napari.widgets._common import ImageResult, get_session
    from napari_mammo_sae._napari.widgets.pacs import start_export
    from napari_mammo_sae.models.backbone import create_backbone
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.inference import Analyzer
    from napari_mammo_sae.models.sae import SparseAutoencoder

    _, files = study
    viewer = make_napari_viewer()
    viewer.open(str(files[0]), plugin="napari-mammo-sae")
    layer = viewer.layers[0]
    torch.manual_seed(0)
    clf = ConceptClassifier(create_backbone("test_efficientnet")).eval()
    sae = SparseAutoencoder(256, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    record = layer.metadata["record"]
    analysis = Analyzer(clf, sae, size=(192, 128), device="cpu").analyse(record)
    neurons = analysis.top_neurons(2)
    session = get_session(viewer)
    session.results[layer.name] = ImageResult(
        layer.name, analysis, layer.metadata["placement"], neurons,
        analysis.logit_contributions[neurons], analysis.latent_maps(neurons),
        box_iou={int(neurons[0]): 0.5, int(neurons[1]): float("nan")},  # nan: no box
    )  # fmt: skip
    from napari_mammo_sae.labels.store import LabelStore

    session.sae_hash = "ab" * 32
    session.label_db = tmp_path / "verdicts.sqlite"
    with LabelStore(session.label_db) as store:
        store.add(session.sae_hash, int(neurons[0]), "clinical", "ann")
        store.add(session.sae_hash, int(neurons[0]), "spurious", "bob")
    # an intervention applied in the interventions dock travels into this image's SR
    from napari_mammo_sae._napari.widgets.intervention import InterventionWidget, Mode

    dock = InterventionWidget(viewer)
    session.current_layer = layer.name
    dock.single.value = int(neurons[0])
    dock.mode.value = Mode.single
    applied = dock.recompute()
    assert session.last_intervention is applied and session.last_intervention_layer == layer.name
    worker = start_export(viewer, tmp_path / "out")
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    written = sorted(p.name.split(".")[-2] for p in (tmp_path / "out").glob("*.dcm"))
    assert written == ["SC", "SEG", "SR"]
    from test_export import sr_numbers, sr_texts

    sr = pydicom.dcmread(next((tmp_path / "out").glob("*.SR.dcm")))
    texts = sr_texts(sr)
    assert texts.count("CLINICAL") == 1 and texts.count("SPURIOUS") == 1
    assert sr_numbers(sr)["BOX-IOU"] == [0.5]
    assert sr_numbers(sr)["P-ORIG"] == [analysis.probability]
    assert sr_numbers(sr)["P-INTERV"] == [pytest.approx(applied.probability)]
    assert sr_numbers(sr)["N-INTERV"] == [1]

    # a region intervention replaces it: the SR then holds the box on the source image
    placement = layer.metadata["placement"]
    rows, cols = record.shape
    box = np.array([[rows * 0.25, cols * 0.25], [rows * 0.5, cols * 0.5]])
    viewer.add_shapes([placement.edge_to_world(box)], shape_type="rectangle", name="region")
    dock.mode.value = Mode.region
    region = dock.last
    assert region is not None and region.mode == "region", dock.intervened.value
    assert session.last_intervention is region
    worker = start_export(viewer, tmp_path / "out-region")
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    sr = pydicom.dcmread(next((tmp_path / "out-region").glob("*.SR.dcm")))
    nums = sr_numbers(sr)
    assert nums["P-INTERV"] == [pytest.approx(region.probability)] and "N-INTERV" not in nums
    assert (
        nums["CELLS-INTERV"] == [session.last_intervention_region[1]]
        and nums["CELLS-INTERV"][0] > 0
    )
    ((x0, y0, x1, y1),) = session.last_intervention_region[0]
    assert (x0, y0, x1, y1) == pytest.approx(
        (cols * 0.25, rows * 0.25, cols * 0.5, rows * 0.5), abs=0.01
    )
