"""DICOMweb client for mammography studies: QIDO-RS search, WADO-RS retrieve into the cache, STOW-RS.

Built on ``dicomweb-client`` (no hand-written HTTP). Every failure becomes a typed
:class:`~napari_mammo_sae.errors.PacsError` whose message names the server (without user info or
query) and what to do - never the query values (accession numbers), credentials or patient data.
"""

from __future__ import annotations

import contextlib
import http
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ..errors import (
    NoMammogramsError,
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsForbiddenError,
    PacsNotFoundError,
    PacsResponseError,
    PacsServerError,
    PacsTransferError,
    StowRejectedError,
)
from ..progress import Progress, check_cancelled
from .cache import InstanceCache, check_uid
from .settings import Credentials, PacsServer, resolve_credentials, server_from_settings

log = logging.getLogger(__name__)

# dicomweb-client and urllib3 log request URLs with their query strings (accession numbers) at
# DEBUG level: keep them quiet even when our own command line runs with -vv.
for _name in ("dicomweb_client", "urllib3.connectionpool", "retrying"):
    if logging.getLogger(_name).getEffectiveLevel() < logging.WARNING:
        logging.getLogger(_name).setLevel(logging.WARNING)

#: attributes asked for at instance level to count mammograms and name their views
INSTANCE_FIELDS = (
    "00080016",  # SOPClassUID
    "00080060",  # Modality
    "00200062",  # ImageLaterality
    "00200060",  # Laterality
    "00185101",  # ViewPosition
    "00540220",  # ViewCodeSequence
    "0008103E",  # SeriesDescription
    "00181030",  # ProtocolName
    "00204000",  # ImageComments
    "00100020",  # PatientID: CBIS-DDSM names the view only there (read, never kept or shown)
)
VIEW_ORDER = ("R CC", "L CC", "R MLO", "L MLO")
STALE_PARTIAL_S = 3600.0  # a temporary file this old is a killed process's, not a live write


@dataclass(frozen=True)
class InstanceRef:
    """One MG image on the server: its UIDs and the laterality and view it shows."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    laterality: str | None = None
    view: str | None = None

    @property
    def view_name(self) -> str:
        return f"{self.laterality or '?'} {self.view or '?'}"


@dataclass(frozen=True)
class StudySummary:
    """One study as the search lists it: no patient name (the accession number stays out of repr)."""

    study_instance_uid: str
    study_date: str  # YYYYMMDD or ""
    accession_number: str = field(default="", repr=False)
    n_images: int = 0  # MG images
    views: tuple[str, ...] = ()  # e.g. ("R CC", "L CC", "R MLO", "L MLO")
    modalities: tuple[str, ...] = ()

    @property
    def date_text(self) -> str:
        d = self.study_date
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d


@dataclass(frozen=True)
class StowResult:
    """What the server stored: SOP Instance UIDs."""

    stored: tuple[str, ...]


# --- JSON helpers --------------------------------------------------------------------------------
def _value(item: dict, tag: str, default: Any = None) -> Any:
    try:
        values = item[tag].get("Value") or []
    except (KeyError, AttributeError):
        return default
    return values[0] if values else default


def _values(item: dict, tag: str) -> list:
    try:
        return list(item[tag].get("Value") or [])
    except (KeyError, AttributeError):
        return []


def _required_uid(item: dict, tag: str) -> str:
    if not isinstance(item, dict):
        raise PacsResponseError("the server's search answer is not a list of DICOM JSON objects")
    value = _value(item, tag)
    if not value:
        raise PacsResponseError(f"the server's search answer lacks a required UID ({tag})")
    return check_uid(value)


def _laterality_view(item: dict) -> tuple[str | None, str | None]:
    from ..dicom import KNOWN_VIEWS, VIEW_CODES, parse_text

    lat = None
    for tag in ("00200062", "00200060"):
        v = str(_value(item, tag, "") or "").strip().upper()
        if v in ("L", "R"):
            lat = v
            break
    view = None
    codes = _values(item, "00540220")
    if codes and isinstance(codes[0], dict):
        view = VIEW_CODES.get(str(_value(codes[0], "00080100", "")))
    if view is None:
        v = str(_value(item, "00185101", "") or "").strip().upper()
        view = v if v in KNOWN_VIEWS else None
    for tag in ("0008103E", "00181030", "00204000", "00100020"):
        if lat and view:
            break
        text = _value(item, tag)
        if text:
            t_lat, t_view = parse_text(str(text))
            lat, view = lat or t_lat, view or t_view
    return lat, view


def _sorted_views(views: Iterable[str]) -> tuple[str, ...]:
    order = {v: i for i, v in enumerate(VIEW_ORDER)}
    return tuple(sorted(set(views), key=lambda v: (order.get(v, len(order)), v)))


def _http_message(status: int, what: str, server: str) -> PacsError:
    if status == 401:
        return PacsAuthError(
            f"{server} asks for credentials to {what} (HTTP 401): set the user name and the "
            "password (MAMMO_SAE_PACS_PASSWORD, keyring or prompt) or a token (MAMMO_SAE_PACS_TOKEN)"
        )
    if status == 403:
        return PacsForbiddenError(
            f"{server} refused to {what} for this user (HTTP 403): ask the PACS administrator "
            "for access"
        )
    if status == 404:
        return PacsNotFoundError(
            f"{server} has no such resource to {what} (HTTP 404): check the URL ends with the "
            "DICOMweb root (e.g. /dicom-web) and the study UID"
        )
    if status >= 500:
        return PacsServerError(
            f"{server} failed to {what} (HTTP {status}): try again later or tell the PACS "
            "administrator"
        )
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    return PacsError(f"{server} answered HTTP {status} ({phrase}) to {what}")


class PacsClient:
    """Search and retrieve mammography studies from a DICOMweb server, store results back."""

    def __init__(
        self,
        server: PacsServer | str | None = None,
        *,
        credentials: Credentials | None = None,
        cache: InstanceCache | str | Path | None = None,
        prompt: Any = None,
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        if not isinstance(server, PacsServer):
            server = server_from_settings(server)
        self.server = server
        creds = credentials if credentials is not None else resolve_credentials(server, prompt)
        session = requests.Session()
        session.verify = server.verify_tls
        if not server.verify_tls:
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override session.verify=False
            # (psf/requests#3829); the environment is ignored for a server the user exempted.
            session.trust_env = False
        if creds.token:
            session.headers["Authorization"] = f"Bearer {creds.token}"
        elif creds.username:
            session.auth = requests.auth.HTTPBasicAuth(creds.username, creds.password or "")
        self._session = session
        self._client = DICOMwebClient(server.url, session=session, timeout=server.timeout_s)
        # no automatic retries: they would also repeat refused connections and log the failing
        # URL (with its query) through the 'retrying' logger; the user retries instead.
        self._client.set_http_retry_params(retry=False)
        self.cache = cache if isinstance(cache, InstanceCache) else InstanceCache(cache)

    def __repr__(self) -> str:
        return f"PacsClient({self.server.name!r})"

    def close(self) -> None:
        self._session.close()

    # --- error mapping ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn transport, HTTP and format failures into typed PacsErrors (no URLs with queries)."""
        name = self.server.name
        try:
            yield
        except PacsError:
            raise
        except requests.exceptions.JSONDecodeError:
            raise PacsResponseError(
                f"{name} sent an answer that is not valid DICOMweb while trying to {what} "
                "(not JSON)"
            ) from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            raise _http_message(status, what, name) from None
        except requests.exceptions.SSLError:
            raise PacsConnectionError(
                f"{name}: the TLS certificate could not be verified; install the hospital's CA "
                "certificate, or turn verification off for this server only if you trust it"
            ) from None
        except requests.Timeout:
            raise PacsConnectionError(
                f"{name} did not answer within {self.server.timeout_s:.0f} s to {what}"
            ) from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
            raise PacsTransferError(
                f"the transfer from {name} was cut off while trying to {what}; what arrived whole "
                "is cached - run it again to resume"
            ) from None
        except requests.ConnectionError as exc:
            if "IncompleteRead" in str(exc) or "Connection broken" in str(exc):
                raise PacsTransferError(
                    f"the transfer from {name} was cut off while trying to {what}; what arrived "
                    "whole is cached - run it again to resume"
                ) from None
            raise PacsConnectionError(
                f"cannot reach {name} to {what} (connection refused or host unknown): check the "
                "URL and that the server is running"
            ) from None
        except requests.RequestException as exc:
            raise PacsConnectionError(
                f"request to {name} failed ({type(exc).__name__}) while trying to {what}"
            ) from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, EOFError) as exc:
            raise PacsResponseError(
                f"{name} sent an answer that is not valid DICOMweb while trying to {what} "
                f"({type(exc).__name__})"
            ) from None
        except Exception as exc:
            if type(exc).__name__ == "InvalidDicomError":
                raise PacsResponseError(
                    f"{name} sent data that is not DICOM while trying to {what}"
                ) from None
            raise

    # --- QIDO-RS ---------------------------------------------------------------------------------
    def search_studies(
        self,
        *,
        study_instance_uid: str | None = None,
        accession_number: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        limit: int = 50,
        summarise: bool = True,
    ) -> list[StudySummary]:
        """Studies with MG images matching the filters (dates as YYYYMMDD or YYYY-MM-DD).

        With ``summarise`` each study's MG images are counted and their views named (one more
        query per study).
        """
        filters: dict[str, str] = {"ModalitiesInStudy": "MG"}
        if study_instance_uid:
            filters["StudyInstanceUID"] = check_uid(study_instance_uid)
        if accession_number:
            filters["AccessionNumber"] = str(accession_number).strip()
        if date_from or date_to:
            a, b = _date(date_from), _date(date_to)
            filters["StudyDate"] = a if a == b else f"{a}-{b}"
        with self._guard("search studies"):
            found = self._client.search_for_studies(
                search_filters=filters, limit=int(limit), fields=["00080061"]
            )
            if not isinstance(found, list):
                raise PacsResponseError(
                    f"{self.server.name}: the study search answer is not a list"
                )
        out = []
        for item in found:
            uid = _required_uid(item, "0020000D")
            modalities = tuple(str(m) for m in _values(item, "00080061"))
            summary = StudySummary(
                uid, str(_value(item, "00080020", "") or ""),
                str(_value(item, "00080050", "") or ""), 0, (), modalities,
            )  # fmt: skip
            if summarise:
                refs = self.list_mammograms(uid, require=False)
                summary = StudySummary(
                    uid, summary.study_date, summary.accession_number, len(refs),
                    _sorted_views(r.view_name for r in refs), modalities,
                )  # fmt: skip
            out.append(summary)
        return out

    def list_mammograms(
        self, study_instance_uid: str, *, require: bool = True
    ) -> list[InstanceRef]:
        """The study's MG images (NoMammogramsError when none and ``require``)."""
        study = check_uid(study_instance_uid)
        with self._guard("list the study's images"):
            items = self._client.search_for_instances(
                study_instance_uid=study,
                search_filters={"Modality": "MG"},
                fields=list(INSTANCE_FIELDS),
                get_remaining=True,
            )
            if not isinstance(items, list):
                raise PacsResponseError(
                    f"{self.server.name}: the instance search answer is not a list"
                )
        refs = []
        for item in items:
            modality = _value(item, "00080060")
            if modality is not None and str(modality) != "MG":
                continue  # a server that ignores the filter
            lat, view = _laterality_view(item)
            refs.append(
                InstanceRef(
                    study,
                    _required_uid(item, "0020000E"),
                    _required_uid(item, "00080018"),
                    lat,
                    view,
                )  # fmt: skip
            )
        if require and not refs:
            with self._guard("look the study up"):
                exists = self._client.search_for_studies(
                    search_filters={"StudyInstanceUID": study}, limit=1
                )
            if not exists:
                raise PacsNotFoundError(f"{self.server.name} has no study {study}")
            raise NoMammogramsError(
                f"study {study} on {self.server.name} holds no MG images (nothing to open)"
            )
        return refs

    # --- WADO-RS ---------------------------------------------------------------------------------
    def retrieve_study(
        self, study_instance_uid: str, progress: Progress | None = None
    ) -> list[Path]:
        """Fetch the study's MG images into the cache (only those not there yet); their paths.

        Each instance is written atomically once complete; ``progress.check_cancelled`` between
        instances stops the retrieve (what arrived stays cached for next time).
        """
        refs = self.list_mammograms(study_instance_uid)
        self.cache.clean_partials(older_than_s=STALE_PARTIAL_S)  # left by a killed process
        missing = [r for r in refs if not self.cache.has(r.sop_instance_uid)]
        if progress is not None:
            progress.set_total(len(refs))
            progress.set_description(f"retrieving {len(missing)} of {len(refs)} MG images")
            progress.update(len(refs) - len(missing))
        t0 = time.perf_counter()
        for ref in missing:
            check_cancelled(progress)
            self.retrieve_instance(ref)
            if progress is not None:
                progress.update(1)
        log.info(
            "study %s: %d MG images, %d retrieved from %s in %.2f s, %d from the cache",
            refs[0].study_instance_uid, len(refs), len(missing), self.server.name,
            time.perf_counter() - t0, len(refs) - len(missing),
        )  # fmt: skip
        return [self.cache.path(r.sop_instance_uid) for r in refs]

    def iter_retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[tuple[int, int, Path]]:
        """Fetch the given instances one by one (cached ones are not fetched again), yielding
        (done, total, path) after each: a caller that stops iterating stops the retrieve."""
        for i, ref in enumerate(refs, start=1):
            if self.cache.has(ref.sop_instance_uid):
                path = self.cache.path(ref.sop_instance_uid)
            else:
                path = self.retrieve_instance(ref)
            yield i, len(refs), path

    def retrieve_instance(self, ref: InstanceRef) -> Path:
        """Fetch one instance as stored on the server (any transfer syntax) into the cache."""
        with self._guard("retrieve an image"):
            ds = self._client.retrieve_instance(
                ref.study_instance_uid, ref.series_instance_uid, ref.sop_instance_uid,
                media_types=(("application/dicom", "*"),),
            )  # fmt: skip
            got = str(getattr(ds, "SOPInstanceUID", ""))
            if got != ref.sop_instance_uid:
                raise PacsResponseError(
                    f"{self.server.name} sent another instance than the one asked for"
                )
            return self.cache.write(ref.sop_instance_uid, ds)

    # --- STOW-RS ---------------------------------------------------------------------------------
    def store(self, datasets: Sequence[Any], study_instance_uid: str | None = None) -> StowResult:
        """Send DICOM objects (pydicom Datasets or file paths) with STOW-RS."""
        import pydicom

        loaded = [pydicom.dcmread(d) if isinstance(d, (str, Path)) else d for d in datasets]
        try:
            with self._guard("store the exported objects"):
                answer = self._client.store_instances(loaded, study_instance_uid=study_instance_uid)
        except (PacsAuthError, PacsForbiddenError, PacsConnectionError, PacsServerError):
            raise
        except PacsError as exc:  # 400, 409 ...: the server looked at the objects and said no
            raise StowRejectedError(f"{exc} (the server rejected them)") from None
        failed = list(getattr(answer, "FailedSOPSequence", None) or [])
        if failed:
            reasons = sorted({str(getattr(f, "FailureReason", "?")) for f in failed})
            raise StowRejectedError(
                f"{self.server.name} refused {len(failed)} of {len(loaded)} objects "
                f"(failure reason {', '.join(reasons)})"
            )
        stored = tuple(
            str(getattr(item, "ReferencedSOPInstanceUID", ""))
            for item in (getattr(answer, "ReferencedSOPSequence", None) or [])
        )
        return StowResult(stored)

    def series_in_study(self, study_instance_uid: str) -> list[dict]:
        """(modality, series UID, number of instances) of each series in the study."""
        study = check_uid(study_instance_uid)
        with self._guard("list the study's series"):
            items = self._client.search_for_series(study_instance_uid=study)
        return [
            {
                "modality": str(_value(i, "00080060", "")),
                "series_instance_uid": _required_uid(i, "0020000E"),
                "n_instances": int(_value(i, "00201209", 0) or 0),
            }
            for i in items
        ]


def _date(text: str | None) -> str:
    if not text:
        return ""
    digits = str(text).replace("-", "").strip()
    if len(digits) != 8 or not digits.isdigit():
        from ..errors import ConfigError

        raise ConfigError("dates are YYYY-MM-DD or YYYYMMDD")
    return digits
