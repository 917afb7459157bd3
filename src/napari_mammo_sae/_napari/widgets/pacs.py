"""PACS dock: search a DICOMweb server, open a study in the hanging layout, export results to DICOM.

The form is magicgui widgets. Search and Open run in worker threads (the viewer never waits on the
network); Open shows progress per image and can be cancelled between images - what arrived stays
in the local cache for next time. The result list shows study date, accession number, number of MG
images and the views present, never the patient's name. The password field is held in memory only;
the URL, user name and the per-server "do not verify TLS" choice are remembered (no secret).

:func:`export_analysis_dialog` is the explorer's "Export to DICOM / send to PACS..." action: it
exports what the explorer last analysed (``ReviewSession.results``) with
:mod:`napari_mammo_sae.dicom_export` in a worker thread and reports where the files went.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from magicgui.widgets import (
    CheckBox,
    Container,
    Label,
    LineEdit,
    Password,
    ProgressBar,
    PushButton,
    Table,
)

from ..inserts import insert_in_turns
from ._common import ScrollingForm, get_session, notify_error, notify_info, start_worker

log = logging.getLogger(__name__)

COLUMNS = ("date", "accession", "MG", "views")


def _views_text(views: tuple[str, ...]) -> str:
    """('R CC', 'L MLO') -> 'RCC, LMLO', as radiologists write them."""
    return ", ".join(v.replace(" ", "") for v in views) or "-"


class PacsDock(ScrollingForm, Container):
    """Dock widget: server, search form, result list, Open (background retrieve) and Cancel."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=False)
        self._scrolling(260)  # in a short dock the form scrolls
        from ...pacs.settings import ENV_URL, load_settings, origin

        self.viewer = napari_viewer
        saved = load_settings()
        url = saved.get("url") or os.environ.get(ENV_URL, "")
        self.url = LineEdit(label="server", value=url)
        self.url.native.setPlaceholderText("https://pacs.example.org/dicom-web")
        self.user = LineEdit(label="user", value=saved.get("username") or "")
        self.password = Password(label="password")
        self.password.native.setPlaceholderText("only kept while napari runs")
        insecure = bool(url) and origin(url) in set(saved.get("insecure_tls_servers") or [])
        self.insecure = CheckBox(text="do not verify this server's TLS certificate", value=insecure)
        self.study = LineEdit(label="study UID")
        self.accession = LineEdit(label="accession")
        self.date_from = LineEdit(label="from")
        self.date_from.native.setPlaceholderText("YYYY-MM-DD")
        self.date_to = LineEdit(label="to")
        self.date_to.native.setPlaceholderText("YYYY-MM-DD")
        self.search_button = PushButton(text="Search")
        self.table = Table(value={c: [] for c in COLUMNS})
        self.open_button = PushButton(text="Open")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="retrieve")
        self.status = Label(value="")
        form = Container(labels=True, widgets=[
            self.url, self.user, self.password, self.insecure, self.study, self.accession,
            self.date_from, self.date_to,
        ])  # fmt: skip
        self.extend([
            form, self.search_button, self.table, self.open_button, self.cancel_button,
            Container(labels=True, widgets=[self.progress]), self.status,
        ])  # fmt: skip
        self._setup_table()
        self.studies: list[Any] = []  # StudySummary per table row
        self.worker: Any = None
        self._pending: list = []  # layer data tuples still to add
        self._opened = self._skipped = 0
        self.search_button.changed.connect(self.search)
        self.open_button.changed.connect(self.open_selected)
        self.cancel_button.changed.connect(self.cancel)

    def _setup_table(self) -> None:
        from qtpy.QtWidgets import QAbstractItemView

        view = self.table.native
        view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        view.setMinimumHeight(140)
        view.setMinimumWidth(340)  # date, accession, count and four views without eliding
        view.verticalHeader().setVisible(False)
        view.setWordWrap(False)
        header = view.horizontalHeader()
        header.setSectionResizeMode(header.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        view.doubleClicked.connect(lambda *_: self.open_selected())

    # --- server ---------------------------------------------------------------------------------
    def client(self) -> Any:
        """A PacsClient for the form's server (settings saved without the password)."""
        from ...pacs import Credentials, PacsClient, resolve_credentials
        from ...pacs.settings import PacsServer, save_settings

        url = self.url.value.strip()
        server = PacsServer(url, username=self.user.value.strip() or None,
                            verify_tls=not self.insecure.value)  # fmt: skip
        save_settings(url=url, username=self.user.value.strip(), insecure=self.insecure.value)
        password = self.password.value
        creds = (
            Credentials(server.username, password)
            if server.username and password
            else resolve_credentials(server)
        )
        return PacsClient(server, credentials=creds)

    def _busy(self, busy: bool, text: str = "") -> None:
        self.search_button.enabled = not busy
        self.open_button.enabled = not busy
        self.cancel_button.enabled = busy
        if text:
            self.status.value = text

    def _failed(self, exc: BaseException) -> None:
        from ...errors import MammoSAEError

        self._busy(False)
        message = str(exc) if isinstance(exc, MammoSAEError) else f"{type(exc).__name__}"
        if not isinstance(exc, MammoSAEError):
            log.error("PACS dock: unexpected %s", type(exc).__name__)
        self.status.value = message
        notify_error(message)

    # --- search ---------------------------------------------------------------------------------
    def search(self, *_: Any) -> Any:
        """Search in a worker thread; the table fills when it returns."""
        try:
            client = self.client()
        except Exception as exc:  # noqa: BLE001 - a bad URL is reported, not raised into Qt
            self._failed(exc)
            return None
        filters = {
            "study_instance_uid": self.study.value.strip() or None,
            "accession_number": self.accession.value.strip() or None,
            "date_from": self.date_from.value.strip() or None,
            "date_to": self.date_to.value.strip() or None,
        }

        def work():
            try:
                return client.search_studies(**filters)
            finally:
                client.close()

        self._busy(True, "searching...")
        self.worker = start_worker(work, _ignore_errors=True,  # errors go to _failed
                                   _connect={"returned": self._show_results, "errored": self._failed})  # fmt: skip
        return self.worker

    def _show_results(self, studies: list) -> None:
        self.studies = list(studies)
        rows = [
            (s.date_text, s.accession_number or "-", s.n_images, _views_text(s.views))
            for s in self.studies
        ]
        self.table.value = {c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)}
        n = len(self.studies)
        self._busy(False, f"{n} stud{'y' if n == 1 else 'ies'} with MG images")
        if self.studies:
            self.table.native.selectRow(0)

    # --- open -----------------------------------------------------------------------------------
    def selected(self) -> Any:
        rows = self.table.native.selectionModel().selectedRows()
        if not rows or rows[0].row() >= len(self.studies):
            return None
        return self.studies[rows[0].row()]

    def open_selected(self, *_: Any) -> Any:
        """Retrieve the selected study in a worker thread and hang it in the viewer."""
        study = self.selected()
        if study is None:
            self.status.value = "select a study first"
            return None
        try:
            client = self.client()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return None
        uid = study.study_instance_uid

        def work():
            from ...dicom import read_mammogram
            from ...errors import DicomReadError
            from ..reader import layer_data_tuples

            try:
                refs = client.list_mammograms(uid)
                yield 0, len(refs)
                paths = []
                for done, total, path in client.iter_retrieve(refs):
                    paths.append(path)
                    yield done, total
            finally:
                client.close()
            records, skipped = [], 0
            for p in paths:
                try:
                    records.append(read_mammogram(p))
                except DicomReadError as exc:
                    log.warning("%s", exc)
                    skipped += 1
            return layer_data_tuples(records) if records else [], skipped

        self.progress.value = 0
        self._busy(True, "retrieving...")
        self.worker = start_worker(work, _ignore_errors=True, _connect={  # errors go to _failed
            "yielded": self._step, "returned": self._hang, "errored": self._failed,
            "aborted": self._cancelled,
        })  # fmt: skip
        return self.worker

    def _step(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress.max = max(1, total)
        self.progress.value = done
        self.status.value = f"retrieved {done} of {total} MG images"

    def _hang(self, value: tuple[list, int]) -> None:
        """Add the exam's layers one per event-loop turn (each insert is itself spread over turns
        by ``insert_in_turns``), so a four-view exam never holds the viewer in one long stall."""
        tuples, skipped = value
        self._pending = list(tuples)
        self._opened, self._skipped = 0, skipped
        self._add_next()

    def _add_next(self) -> None:
        from napari.layers import Layer
        from qtpy.QtCore import QTimer

        if not self._pending:
            if self._opened:
                self.viewer.reset_view()
            self._busy(False)
            self.status.value = f"opened {self._opened} views" + (
                f" ({self._skipped} unreadable)" if self._skipped else ""
            )
            return
        data, kwargs, kind = self._pending.pop(0)
        self._opened += 1
        # the next view once this one is in (its turns done): "opened" means every view is in
        insert_in_turns(self.viewer, Layer.create(data, kwargs, kind), self.native, self._failed,
                        on_done=lambda: QTimer.singleShot(0, self._add_next))  # fmt: skip

    def cancel(self, *_: Any) -> None:
        """Stop the retrieve after the image in flight (what arrived stays cached)."""
        if self.worker is not None:
            self.worker.quit()

    def _cancelled(self) -> None:
        self._busy(False, "cancelled - the images already retrieved stay cached")


# --- export (the explorer's action) ---------------------------------------------------------------
def _layer_source(viewer: Any, result: Any) -> Path | None:
    """Where napari opened an analysed layer from (a file or a folder), if it knows."""
    try:
        layer = viewer.layers[result.layer_name]
    except (KeyError, ValueError):
        return None
    source = getattr(getattr(layer, "source", None), "path", None)
    return Path(source) if source else None


def _source_path(uid: str, opened_from: Path | None) -> Path | None:
    """The DICOM file of SOP Instance ``uid``: the PACS cache, else the file or folder it was
    opened from (headers only; runs in the worker thread)."""
    import pydicom

    from ...pacs.cache import InstanceCache

    try:
        cached = InstanceCache().path(uid)
        if cached.is_file():
            return cached
    except Exception:  # noqa: BLE001 - not a cacheable UID
        pass
    if opened_from is None:
        return None
    candidates = (
        [opened_from]
        if opened_from.is_file()
        else sorted(p for p in opened_from.rglob("*") if p.is_file())
    )
    for p in candidates:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if str(ds.get("SOPInstanceUID", "")) == uid:
            return p
    return None


def _identity(session: Any) -> Any:
    from ...dicom_export import ModelIdentity
    from ...export_cli import identity_of

    models = session.models
    if models is None:
        return ModelIdentity("unknown", "", "unknown", session.sae_hash or "", session.concept)
    ident = identity_of(
        Path(models.choice.classifier), Path(models.choice.sae), models.config or {}
    )
    return ModelIdentity(
        ident.classifier, ident.classifier_sha256, ident.sae, ident.sae_sha256, session.concept,
        ident.preprocess,
    )  # fmt: skip


def _verdicts(session: Any, neurons: list[int]) -> dict[int, list[str]]:
    if not session.label_db or not session.sae_hash:
        return {}
    try:
        from ...dicom_export import verdicts_from_store

        return verdicts_from_store(session.label_db, session.sae_hash, neurons)
    except Exception as exc:  # noqa: BLE001 - verdicts are optional in the export
        log.warning("verdicts not exported: %s", type(exc).__name__)
        return {}


def start_export(viewer: Any, folder: str | Path, stow_url: str | None = None) -> Any:
    """Export every analysed image of the viewer's session in a worker thread; the worker."""
    from ...dicom_export import ExportInput, InterventionSummary, export_analysis, stow
    from ...errors import ExportError

    session = get_session(viewer)
    results = list(session.results.values())
    if not results:
        notify_error("nothing to export: analyse an image with the Neuron explorer first")
        return None
    # read the viewer on this (GUI) thread; the worker only touches files and the network
    opened_from = {r.layer_name: _layer_source(viewer, r) for r in results}
    iv = getattr(session, "last_intervention", None)
    iv_layer = getattr(session, "last_intervention_layer", None)
    boxes, cells = getattr(session, "last_intervention_region", None) or ((), 0)
    folder = Path(folder)

    def work():
        identity = _identity(session)  # hashes the weights files: not on the GUI thread
        out = []
        for r in results:
            source = _source_path(r.placement.record.sop_instance_uid, opened_from[r.layer_name])
            if source is None:
                raise ExportError(
                    f"{r.layer_name}: its DICOM file was not found (open it from a file, a folder "
                    "or the PACS dock to export it)"
                )
            neurons = [int(n) for n in r.neurons]
            inp = ExportInput(
                source, r.analysis, identity, neurons=neurons,
                scores=[float(s) for s in r.scores], box_iou=dict(r.box_iou),
                verdicts=_verdicts(session, neurons), record=r.placement.record,
                intervention=None if iv is None or r.layer_name != iv_layer else InterventionSummary(
                    str(iv.mode), tuple(int(n) for n in iv.neurons), float(iv.probability),
                    float(iv.logit), boxes=tuple(boxes) if iv.mode == "region" else (),
                    cells=int(cells) if iv.mode == "region" else 0,
                ),
            )  # fmt: skip
            out.append(export_analysis(inp, folder))
        message = f"{len(out)} images exported as DICOM to {folder}"
        if stow_url:
            from ...pacs import PacsClient
            from ...pacs.settings import server_from_settings

            client = PacsClient(server_from_settings(stow_url))
            try:
                n = stow(out, client)
            finally:
                client.close()
            message += f"; {n} objects sent to {client.server.name}"
        return message

    return start_worker(work, _ignore_errors=True,  # errors go to the notification
                        _connect={"returned": notify_info, "errored": lambda e: notify_error(str(e))})  # fmt: skip


def export_analysis_dialog(viewer: Any) -> None:
    """Ask for an output folder and an optional PACS to send to, then export in the background."""
    from qtpy.QtWidgets import QFileDialog, QInputDialog

    from ...pacs.settings import load_settings
    from ..inserts import main_window

    if not get_session(viewer).results:
        notify_error("nothing to export: analyse an image with the Neuron explorer first")
        return
    parent = main_window(viewer)
    folder = QFileDialog.getExistingDirectory(parent, "Export the analysis as DICOM to...")
    if not folder:
        return
    url, ok = QInputDialog.getText(
        parent, "Send to PACS",
        "DICOMweb URL to send the objects to (leave empty to keep them on disk only):",
        text=load_settings().get("url", ""),
    )  # fmt: skip
    if not ok:
        return
    start_export(viewer, folder, url.strip() or None)
