"""Session fixtures: a real PACS (Orthanc with its DICOMweb plugin) on loopback, for the PACS tests.

Each fixture starts ``/usr/sbin/Orthanc`` once per session on random 127.0.0.1 ports with its own
temporary storage, waits for ``GET /system`` with a bounded loop and stops the process at the end.
``orthanc`` is open; ``orthanc_auth`` requires HTTP basic authentication (user ``reader``), to test
401s. Tests that need them skip nothing: a missing Orthanc is a failure that says what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AUTH_USER, AUTH_PASSWORD = "reader", "s3cret-pw"


@dataclass
class OrthancServer:
    """A running Orthanc: its REST root, DICOMweb root and (for the auth variant) credentials."""

    url: str
    auth: tuple[str, str] | None
    process: subprocess.Popen
    storage: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, path: str | Path) -> dict:
        """Store one DICOM file with Orthanc's REST API (seeding, not our client)."""
        r = requests.post(
            f"{self.url}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=60
        )
        r.raise_for_status()
        return r.json()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_orthanc(folder: Path, *, auth: bool = False, timeout_s: float = 30.0) -> OrthancServer:
    """Start Orthanc with DICOMweb on free loopback ports, storing under ``folder``."""
    if not (Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()):
        pytest.fail(
            "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (make test)"
        )
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "mammo-sae-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": auth,
        "RegisteredUsers": {AUTH_USER: AUTH_PASSWORD} if auth else {},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
        "StorageCompression": False,
        "HttpCompressionEnabled": False,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    credentials = (AUTH_USER, AUTH_PASSWORD) if auth else None
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"Orthanc exited at start:\n{(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/system", auth=credentials, timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail(f"Orthanc did not answer within {timeout_s:.0f} s")
        time.sleep(0.1)
    return OrthancServer(url, credentials, proc, folder)


def stop_orthanc(server: OrthancServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


@pytest.fixture(scope="session")
def orthanc():
    """An open Orthanc (DICOMweb at ``.dicomweb``), empty at the start of the session."""
    folder = Path(tempfile.mkdtemp(prefix="mammo-sae-orthanc-"))
    server = start_orthanc(folder)
    try:
        yield server
    finally:
        stop_orthanc(server)
        if not os.environ.get("KEEP_ORTHANC"):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def orthanc_auth():
    """An Orthanc that requires HTTP basic authentication (``.auth`` holds the good pair)."""
    folder = Path(tempfile.mkdtemp(prefix="mammo-sae-orthanc-auth-"))
    server = start_orthanc(folder, auth=True)
    try:
        yield server
    finally:
        stop_orthanc(server)
        shutil.rmtree(folder, ignore_errors=True)
