"""PACS faults Orthanc cannot produce on demand, from a tiny DICOMweb stand-in on 127.0.0.1:
403, 5xx, malformed answers, a retrieve cut off mid-transfer (no half file, resumes), a rejected
STOW (the export stays on disk), TLS verification, and where settings and secrets may go."""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from data_helpers import write_mammogram
from napari_mammo_sae.dicom_export import ExportResult, stow
from napari_mammo_sae.errors import (
    ConfigError,
    PacsAuthError,
    PacsConnectionError,
    PacsForbiddenError,
    PacsResponseError,
    PacsServerError,
    PacsTransferError,
    StowRejectedError,
)
from napari_mammo_sae.pacs import Credentials, InstanceCache, PacsClient, PacsServer
from napari_mammo_sae.pacs.settings import (
    ENV_TOKEN,
    save_settings,
    server_from_settings,
    settings_file,
)
from napari_mammo_sae.progress import Cancelled

BOUNDARY = "fake-boundary-1234"


class FakePacs:
    """A scripted DICOMweb server: studies of small MG files, with faults switched on per test."""

    def __init__(self, files: list[Path], tls: ssl.SSLContext | None = None):
        self.files = {str(pydicom.dcmread(f).SOPInstanceUID): f.read_bytes() for f in files}
        self.headers = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
        self.status: int | None = None  # answer every request with this status
        self.qido_body: bytes | None = None  # answer searches with this body
        self.wado_body: bytes | None = None  # answer retrieves with this body
        self.cut: set[str] = set()  # SOP UIDs whose transfer is cut off halfway
        self.stow_status = 200
        self.log: list[tuple[str, str, dict]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", ctype="application/dicom+json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                fake.log.append(("GET", self.path, dict(self.headers)))
                if fake.status:
                    return self._send(fake.status, b"{}")
                path, _, query = self.path.partition("?")
                if "offset=" in query and "offset=0" not in query:
                    return self._send(200, b"[]")  # paging: everything fitted on the first page
                if "/instances/" in path:
                    return self._wado(path.rsplit("/", 1)[-1])
                if fake.qido_body is not None:
                    return self._send(200, fake.qido_body)
                if path.endswith("/instances"):
                    return self._send(200, json.dumps(fake.instances()).encode())
                return self._send(200, json.dumps(fake.studies()).encode())

            def _wado(self, uid):
                data = fake.files[uid]
                body = (
                    f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + data
                    + f"\r\n--{BOUNDARY}--\r\n".encode()
                )
                if fake.wado_body is not None:
                    body = fake.wado_body
                self.send_response(200)
                self.send_header(
                    "Content-Type",
                    f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if uid in fake.cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def do_POST(self):
                fake.log.append(("POST", self.path, dict(self.headers)))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if fake.status:
                    return self._send(fake.status, b"{}")
                return self._send(fake.stow_status, b"{}")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _json(self, ds: Dataset, keys) -> dict:
        out = Dataset()
        for k in keys:
            if k in ds:
                setattr(out, k, getattr(ds, k))
        return out.to_json_dict()

    def studies(self) -> list[dict]:
        first = next(iter(self.headers.values()))
        return [self._json(first, ["StudyInstanceUID", "StudyDate", "AccessionNumber"])]

    def instances(self) -> list[dict]:
        keys = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                "Modality", "ImageLaterality", "ViewCodeSequence"]  # fmt: skip
        return [self._json(ds, keys) for ds in self.headers.values()]

    def wado_gets(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for m, p, _ in self.log if m == "GET" and "/instances/" in p]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def study_files(tmp_path) -> list[Path]:
    """Two small MG files of one study (synthetic, with fake patient values)."""
    study = pydicom.uid.generate_uid()
    out = []
    for i, view in enumerate(("CC", "MLO")):
        p = write_mammogram(tmp_path / f"src{i}.dcm", view_code=view, rows=64, cols=48)
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = study
        ds.StudyDate = "20250102"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


@pytest.fixture()
def fake(study_files):
    server = FakePacs(study_files)
    yield server
    server.close()


def client_for(fake, tmp_path, **kw) -> PacsClient:
    return PacsClient(
        PacsServer(fake.url, timeout_s=5), credentials=kw.pop("credentials", Credentials()),
        cache=tmp_path / "cache", **kw,
    )  # fmt: skip


def test_the_stand_in_serves_a_working_study(fake, tmp_path):
    client = client_for(fake, tmp_path)
    (study,) = client.search_studies()
    assert study.n_images == 2 and study.views == ("L CC", "L MLO")
    paths = client.retrieve_study(study.study_instance_uid)
    assert [p.read_bytes()[128:132] for p in paths] == [b"DICM", b"DICM"]


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, PacsAuthError), (403, PacsForbiddenError), (500, PacsServerError),
     (503, PacsServerError)],
)  # fmt: skip
def test_http_errors_are_typed_and_quote_no_query_values(fake, tmp_path, status, error):
    fake.status = status
    with pytest.raises(error, match=str(status)) as info:
        client_for(fake, tmp_path).search_studies(accession_number="ACC-SECRET-77")
    assert "ACC-SECRET-77" not in str(info.value) and "?" not in str(info.value)


def test_malformed_answers_are_response_errors(fake, tmp_path, study_files):
    client = client_for(fake, tmp_path)
    study = str(pydicom.dcmread(study_files[0]).StudyInstanceUID)
    fake.qido_body = b"<html>this is not JSON</html>"
    with pytest.raises(PacsResponseError, match="not valid DICOMweb"):
        client.search_studies()
    fake.qido_body = json.dumps([{"00080020": {"vr": "DA", "Value": ["20250102"]}}]).encode()
    with pytest.raises(PacsResponseError, match="lacks a required UID"):
        client.search_studies(summarise=False)
    fake.qido_body = json.dumps({"not": "a list"}).encode()
    with pytest.raises(PacsResponseError):
        client.search_studies()
    fake.qido_body = None
    fake.wado_body = b"garbage without any multipart boundary"
    with pytest.raises(PacsResponseError):
        client.retrieve_study(study)
    fake.wado_body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nNOT DICOM AT ALL"
        f"\r\n--{BOUNDARY}--\r\n"
    ).encode()
    with pytest.raises(PacsResponseError):
        client.retrieve_study(study)
    assert list(client.cache.root.rglob("*.dcm")) == [] and client.cache.partials() == []


def test_cut_off_retrieve_leaves_no_half_file_and_resumes(fake, tmp_path, study_files):
    client = client_for(fake, tmp_path)
    study = str(pydicom.dcmread(study_files[0]).StudyInstanceUID)
    uids = list(fake.files)
    fake.cut = {uids[1]}
    with pytest.raises(PacsTransferError, match="run it again to resume"):
        client.retrieve_study(study)
    assert client.cache.has(uids[0]) and not client.cache.has(uids[1])
    assert client.cache.partials() == []
    stale = client.cache.path(uids[1]).with_name(f".{uids[1]}.x.part")  # a killed process's
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a file")
    os.utime(stale, (1, 1))
    fake.cut = set()
    fake.log.clear()
    paths = client.retrieve_study(study)
    assert not stale.exists() and client.cache.partials() == []
    assert fake.wado_gets() == [uids[1]]  # only what was missing
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in paths}
    for uid, original in zip(uids, study_files, strict=True):
        got, want = pydicom.dcmread(by_uid[uid]), pydicom.dcmread(original)
        assert got.PixelData == want.PixelData


def test_cancel_stops_between_instances_and_keeps_what_arrived(fake, tmp_path, study_files):
    class CancelAfterOne:
        cancelled = False

        def set_total(self, total):
            pass

        def set_description(self, text):
            pass

        def update(self, n=1):
            self.cancelled = self.cancelled or n > 0

    client = client_for(fake, tmp_path)
    study = str(pydicom.dcmread(study_files[0]).StudyInstanceUID)
    with pytest.raises(Cancelled):
        client.retrieve_study(study, progress=CancelAfterOne())
    assert sum(client.cache.has(u) for u in fake.files) == 1


def test_rejected_stow_keeps_the_export_on_disk_and_says_where(fake, tmp_path, study_files):
    folder = tmp_path / "export"
    folder.mkdir()
    paths = [shutil.copy(p, folder / p.name) for p in study_files]
    result = ExportResult(folder, Path(paths[0]), Path(paths[1]), Path(paths[1]), "1.2", "1.2", (),
                          ())  # fmt: skip
    fake.stow_status = 409
    with pytest.raises(StowRejectedError) as info:
        stow([result], client_for(fake, tmp_path))
    assert str(folder) in str(info.value) and info.value.folder == folder
    assert all(Path(p).exists() for p in paths)
    fake.stow_status = 200
    fake.status = 500  # a failing server is reported the same way, export kept
    with pytest.raises(StowRejectedError, match="kept in"):
        stow([result], client_for(fake, tmp_path))


def test_export_cli_with_verdicts_and_a_refusing_stow_target(fake, tmp_path, study_files, capsys):
    from napari_mammo_sae.cli import main
    from napari_mammo_sae.labels.store import LabelStore
    from napari_mammo_sae.models.inference import Analyzer
    from napari_mammo_sae.models.weights import bundled_weights_dir, sha256_file

    root = bundled_weights_dir()
    analyzer = Analyzer.from_weights(
        root / "finetuned-calcification", root / "sae-finetuned-calcification", device="cpu"
    )
    first, second = (int(n) for n in analyzer.analyse_path(study_files[0]).top_neurons(2))
    sae_hash = sha256_file(root / "sae-finetuned-calcification" / "model.safetensors")
    db = tmp_path / "verdicts.sqlite"
    with LabelStore(db) as store:  # the verdicts clinicians gave on this image's top neurons
        store.add(sae_hash, first, "spurious", "ann")
        store.add(sae_hash, second, "clinical", "ann")
        store.add(sae_hash, second, "clinical", "bob")
    uid = str(pydicom.dcmread(study_files[0]).SOPInstanceUID)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"SOPInstanceUID,xmin,ymin,xmax,ymax,label\n{uid},5,10,40,60,mass\n")
    fake.stow_status = 400
    out = tmp_path / "out"
    rc = main(["export", str(study_files[0]), "--out", str(out), "--top", "2", "--labels",
               str(db), "--boxes", str(boxes), "--stow", fake.url])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == StowRejectedError.exit_code and str(out) in err
    assert len(list(out.glob("*.dcm"))) == 3
    from test_export import sr_numbers, sr_texts

    sr = pydicom.dcmread(next(out.glob("*.SR.dcm")))
    texts = sr_texts(sr)
    assert f"neuron {first} rank 1" in texts and f"neuron {second} rank 2" in texts
    assert texts.count("SPURIOUS") == 1 and texts.count("CLINICAL") == 2
    ious = sr_numbers(sr)["BOX-IOU"]
    assert len(ious) == 2 and all(0.0 <= v <= 1.0 for v in ious)


def test_token_is_sent_and_never_logged(fake, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ENV_TOKEN, "tok-very-secret")
    caplog.set_level(logging.DEBUG)
    client = PacsClient(PacsServer(fake.url), cache=tmp_path / "c")
    client.search_studies()
    assert fake.log[0][2].get("Authorization") == "Bearer tok-very-secret"
    assert "tok-very-secret" not in caplog.text + repr(client)


def test_settings_hold_no_secrets_and_name_servers_without_tls_checks(monkeypatch):
    with pytest.raises(ConfigError, match="no user name or password in the PACS URL"):
        PacsServer("https://bob:pw@pacs.example/dicom-web")
    with pytest.raises(ConfigError):
        PacsServer("ftp://pacs.example/")
    save_settings(url="https://pacs-a.example:8443/dicom-web", username="bob", insecure=True)
    assert server_from_settings().verify_tls is False
    assert server_from_settings("https://pacs-b.example/dicom-web").verify_tls is True
    assert server_from_settings().username == "bob"
    text = settings_file().read_text()
    assert "pw" not in text and "password" not in text
    save_settings(url="https://pacs-a.example:8443/dicom-web", insecure=False)
    assert server_from_settings().verify_tls is True


@pytest.fixture()
def tls_fake(study_files, tmp_path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test server's certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = FakePacs(study_files, tls=ctx)
    yield server
    server.close()


def test_tls_certificates_are_verified_unless_turned_off_for_that_server(tls_fake, tmp_path):
    with pytest.raises(PacsConnectionError, match="TLS certificate"):
        PacsClient(PacsServer(tls_fake.url), credentials=Credentials(),
                   cache=tmp_path / "a").search_studies()  # fmt: skip
    insecure = PacsServer(tls_fake.url, verify_tls=False)
    found = PacsClient(insecure, credentials=Credentials(), cache=tmp_path / "b").search_studies()
    assert len(found) == 1


def test_cache_names_are_uids_only(tmp_path):
    cache = InstanceCache(tmp_path)
    with pytest.raises(PacsResponseError):
        cache.path("../../etc/passwd")
    p = cache.write("1.2.3.4", b"x" * 10)
    assert p.name == "1.2.3.4.dcm" and cache.has("1.2.3.4") and cache.partials() == []


def test_password_from_keyring_then_prompt_never_from_settings(monkeypatch):
    import sys
    import types

    from napari_mammo_sae.pacs import resolve_credentials

    server = PacsServer("https://pacs.example:8443/dicom-web", username="bob")
    asked = []
    monkeypatch.setitem(sys.modules, "keyring", None)  # no keyring installed: the prompt asks
    creds = resolve_credentials(server, prompt=lambda msg: asked.append(msg) or "typed-pw")
    assert creds.password == "typed-pw" and "bob" in asked[0] and "typed-pw" not in repr(creds)
    fake = types.SimpleNamespace(
        get_password=lambda service, user: (
            "ring-pw"
            if (service, user) == ("napari-mammo-sae-pacs:https://pacs.example:8443", "bob")
            else None
        )
    )
    monkeypatch.setitem(sys.modules, "keyring", fake)
    creds = resolve_credentials(server, prompt=lambda msg: pytest.fail("asked despite keyring"))
    assert creds.password == "ring-pw" and creds.kind == "basic"


def test_cli_search_prints_a_table_without_patient_names(fake, study_files, capsys):
    from napari_mammo_sae.cli import main

    assert main(["pacs", "search", "--url", fake.url]) == 0
    out = capsys.readouterr().out
    ds = pydicom.dcmread(study_files[0])
    assert "2025-01-02" in out and "L CC, L MLO" in out and str(ds.StudyInstanceUID) in out
    assert str(ds.PatientName) not in out and str(ds.PatientID) not in out
