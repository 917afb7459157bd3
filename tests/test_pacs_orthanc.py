"""Round trip against a real PACS (Orthanc + DICOMweb, started by tests/fixtures_orthanc.py).

CBIS-DDSM views and a phantom four-view study are stored in Orthanc; our client searches and
retrieves them, the bundled models analyse them, the DICOM exports go back with STOW-RS and are
queried back from the right study. Faults Orthanc can produce (401, 404, refused, a study without
MG images, a rejected STOW) give typed errors.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from napari_mammo_sae.cli import main
from napari_mammo_sae.dicom import read_mammogram
from napari_mammo_sae.dicom_export import ExportInput, ModelIdentity, export_analysis, stow
from napari_mammo_sae.errors import (
    NoMammogramsError,
    PacsAuthError,
    PacsConnectionError,
    PacsNotFoundError,
    StowRejectedError,
)
from napari_mammo_sae.pacs import Credentials, PacsClient
from napari_mammo_sae.pacs.settings import ENV_PASSWORD, ENV_USER, save_settings, settings_file

torch.set_num_threads(2)
ACCESSION = "ACC-PH-0001"


class Steps:
    """A progress object that records what it was told."""

    def __init__(self):
        self.total, self.done, self.texts = None, 0, []

    def set_total(self, total):
        self.total = total

    def update(self, n=1):
        self.done += n

    def set_description(self, text):
        self.texts.append(text)

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def seeded(orthanc, cbis_files, tmp_path_factory):
    """Orthanc holding 4 CBIS-DDSM views (4 studies), a phantom 4-view study and a CT study."""
    from pydicom.data import get_testdata_file

    from napari_mammo_sae.phantom.dataset import PhantomConfig, write_dataset

    root = tmp_path_factory.mktemp("phantom")
    cfg = PhantomConfig(studies=1, seed=3, height=448, width=368, spacing_mm=0.6)
    write_dataset(cfg, root, workers=1)
    phantom = sorted(root.rglob("*.dicom"))
    assert len(phantom) == 4
    for p in phantom:  # give the study an accession number to search by
        ds = pydicom.dcmread(p)
        ds.AccessionNumber = ACCESSION
        ds.save_as(p, enforce_file_format=True)
        orthanc.upload(p)
    for p in cbis_files[:4]:
        orthanc.upload(p)
    ct = get_testdata_file("CT_small.dcm")
    orthanc.upload(ct)
    return {
        "phantom": phantom,
        "phantom_study": str(pydicom.dcmread(phantom[0]).StudyInstanceUID),
        "cbis": cbis_files[:4],
        "ct_study": str(pydicom.dcmread(ct).StudyInstanceUID),
    }


@pytest.fixture()
def client(orthanc, tmp_path):
    c = PacsClient(orthanc.dicomweb, credentials=Credentials(), cache=tmp_path / "cache")
    yield c
    c.close()


@pytest.fixture(scope="module")
def analyzer():
    from napari_mammo_sae.models.inference import Analyzer
    from napari_mammo_sae.models.weights import bundled_weights_dir

    root = bundled_weights_dir()
    return Analyzer.from_weights(
        root / "finetuned-calcification", root / "sae-finetuned-calcification", device="cpu"
    )


def test_search_by_uid_accession_and_date_lists_mg_studies_only(client, seeded):
    (study,) = client.search_studies(study_instance_uid=seeded["phantom_study"])
    assert study.n_images == 4
    assert study.views == ("R CC", "L CC", "R MLO", "L MLO")
    assert study.date_text == "2026-01-01" and study.accession_number == ACCESSION
    assert ACCESSION not in repr(study)
    by_accession = client.search_studies(accession_number=ACCESSION)
    assert [s.study_instance_uid for s in by_accession] == [seeded["phantom_study"]]
    cbis = client.search_studies(date_from="2016-10-04", date_to="2016-10-04")
    cbis_studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in
                    seeded["cbis"]}  # fmt: skip
    assert {s.study_instance_uid for s in cbis} == cbis_studies
    assert sorted(v for s in cbis for v in s.views) == ["L CC", "L MLO", "R CC", "R MLO"]
    everything = client.search_studies()
    assert seeded["ct_study"] not in {s.study_instance_uid for s in everything}


def test_retrieve_fills_the_cache_and_is_reused(client, seeded, monkeypatch):
    steps = Steps()
    paths = client.retrieve_study(seeded["phantom_study"], progress=steps)
    assert len(paths) == 4 and steps.total == 4 and steps.done == 4
    originals = {read_mammogram(p).sop_instance_uid: read_mammogram(p) for p in seeded["phantom"]}
    for p in paths:
        rec = read_mammogram(p)
        np.testing.assert_array_equal(rec.pixels, originals[rec.sop_instance_uid].pixels)
        assert p.name == f"{rec.sop_instance_uid}.dcm"
    assert not client.cache.partials()

    def no_network(*a, **k):
        raise AssertionError("the cached study was fetched again")

    monkeypatch.setattr(client._client, "retrieve_instance", no_network)
    again = Steps()
    assert client.retrieve_study(seeded["phantom_study"], progress=again) == paths
    assert again.done == 4 and "retrieving 0 of 4" in again.texts[0]


def test_round_trip_exports_go_back_to_the_right_study(client, seeded, analyzer, tmp_path):
    identity = ModelIdentity("finetuned-calcification", "", "sae-finetuned-calcification", "",
                             "calcification")  # fmt: skip
    results, analyses = [], {}
    for path in client.retrieve_study(seeded["phantom_study"]):
        record = read_mammogram(path)
        analysis = analyzer.analyse(record)
        analyses[record.sop_instance_uid] = analysis
        inp = ExportInput(path, analysis, identity, record=record, k=2)
        results.append(export_analysis(inp, tmp_path / "export"))
    cbis_path = client.retrieve_study(
        str(pydicom.dcmread(seeded["cbis"][0], stop_before_pixels=True).StudyInstanceUID)
    )[0]
    cbis_record = read_mammogram(cbis_path)
    cbis_analysis = analyzer.analyse(cbis_record)
    results.append(
        export_analysis(
            ExportInput(cbis_path, cbis_analysis, identity, record=cbis_record, k=1),
            tmp_path / "export",
        )
    )
    from test_export import dciodvfy_errors

    for res in results:  # phantom (MG For Presentation) and CBIS-DDSM (Secondary Capture) sources
        for path in res.paths:
            assert dciodvfy_errors(path) == [], path.name
    assert stow(results, client) == 15

    series = client.series_in_study(seeded["phantom_study"])
    modalities = sorted(s["modality"] for s in series)
    assert modalities.count("SEG") == 4 and modalities.count("SR") == 4
    assert modalities.count("OT") == 4  # the Secondary Captures
    assert sum(s["n_instances"] for s in series if s["modality"] == "MG") == 4
    cbis_series = client.series_in_study(cbis_record.study_instance_uid)
    assert sorted(s["modality"] for s in cbis_series).count("SEG") == 1
    # the mammograms are still the study's only MG images
    assert len(client.list_mammograms(seeded["phantom_study"])) == 4
    # query one SR back and compare its numbers with the analysis
    res = results[0]
    sr_uid = pydicom.dcmread(res.report, stop_before_pixels=True)
    back = client._client.retrieve_instance(
        seeded["phantom_study"], sr_uid.SeriesInstanceUID, sr_uid.SOPInstanceUID
    )
    from test_export import sr_numbers

    nums = sr_numbers(back)
    a = analyses[res.source_sop_instance_uid]
    assert nums["P-ORIG"] == [a.probability] and nums["P-SAE"] == [a.reconstruction_probability]
    assert back.StudyInstanceUID == seeded["phantom_study"]


def test_cli_search_and_get(orthanc, seeded, tmp_path, capsys):
    assert main(["pacs", "search", "--url", orthanc.dicomweb, "--accession", ACCESSION,
                 "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert [(r["study_instance_uid"], r["mg_images"]) for r in rows] == [
        (seeded["phantom_study"], 4)
    ]
    assert "patient" not in json.dumps(rows).lower()
    out = tmp_path / "exam"
    rc = main(["pacs", "get", seeded["phantom_study"], "--out", str(out), "--url",
               orthanc.dicomweb, "--cache", str(tmp_path / "cache")])  # fmt: skip
    assert rc == 0 and len(list(out.glob("*.dcm"))) == 4
    assert len({read_mammogram(p).view for p in out.glob("*.dcm")}) == 2


def test_a_study_without_mg_images_and_an_unknown_study(client, orthanc, seeded, tmp_path, capsys):
    with pytest.raises(NoMammogramsError, match="no MG images"):
        client.retrieve_study(seeded["ct_study"])
    with pytest.raises(PacsNotFoundError):
        client.retrieve_study("1.2.3.4.5.6.7")
    rc = main(["pacs", "get", seeded["ct_study"], "--out", str(tmp_path / "x"), "--url",
               orthanc.dicomweb, "--cache", str(tmp_path / "c")])  # fmt: skip
    assert rc == NoMammogramsError.exit_code and "no MG images" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_wrong_root_is_404_and_a_closed_port_is_refused(orthanc):
    with pytest.raises(PacsNotFoundError, match="404"):
        PacsClient(orthanc.url + "/no-such-root", credentials=Credentials()).search_studies()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PacsConnectionError, match="cannot reach"):
        PacsClient(f"http://127.0.0.1:{port}/dicom-web", credentials=Credentials()).search_studies()


def test_rejected_stow_keeps_the_export_and_says_where(client, seeded, tmp_path):
    res = export_result_stub(seeded, tmp_path)
    with pytest.raises(StowRejectedError) as info:
        client.store(res, study_instance_uid="1.2.3.4")  # objects of another study: 409
    assert "rejected" in str(info.value)


def export_result_stub(seeded, tmp_path) -> list[Path]:
    """A DICOM file of the phantom study, to send where it does not belong."""
    p = tmp_path / "one.dcm"
    ds = pydicom.dcmread(seeded["phantom"][0])
    ds.save_as(p, enforce_file_format=True)
    return [p]


def test_authentication_401_and_secrets_never_logged(orthanc_auth, cbis_files, tmp_path,
                                                     monkeypatch, caplog):  # fmt: skip
    orthanc_auth.upload(cbis_files[0])
    user, password = orthanc_auth.auth
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PacsAuthError, match="401") as none:
        PacsClient(orthanc_auth.dicomweb, credentials=Credentials()).search_studies()
    with pytest.raises(PacsAuthError) as wrong:
        PacsClient(
            orthanc_auth.dicomweb, credentials=Credentials(user, "not-" + password)
        ).search_studies()
    # the user name from the settings file, the password from the environment
    monkeypatch.setenv(ENV_USER, user)
    monkeypatch.setenv(ENV_PASSWORD, password)
    save_settings(url=orthanc_auth.dicomweb)
    good = PacsClient(cache=tmp_path / "c")
    assert len(good.search_studies()) == 1
    assert len(good.retrieve_study(good.search_studies()[0].study_instance_uid)) == 1
    for text in (str(none.value), str(wrong.value), repr(good), caplog.text,
                 settings_file().read_text(), repr(Credentials(user, password))):  # fmt: skip
        assert password not in text
