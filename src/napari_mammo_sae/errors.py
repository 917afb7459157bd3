"""Typed errors: each says what is wrong and what to do, and never carries patient-identifying values."""

from __future__ import annotations


class MammoSAEError(Exception):
    """Base class of every error this package raises on purpose."""

    #: exit status of the command line when this error ends a command
    exit_code: int = 1


# --- DICOM input -------------------------------------------------------------------------------
class DicomReadError(MammoSAEError):
    """A DICOM file could not be turned into a mammogram record."""

    exit_code = 3


class NotDicomError(DicomReadError):
    """The file is not DICOM (no preamble/meta header, or it does not parse)."""


class NoPixelDataError(DicomReadError):
    """The DICOM object carries no image (structured report, presentation state, ...)."""


class CorruptPixelDataError(DicomReadError):
    """Pixel data is truncated or does not decode."""


class MissingDecoderError(DicomReadError):
    """The transfer syntax needs a decoder package that is not installed."""


class UnsupportedImageError(DicomReadError):
    """A valid image we do not analyse: colour, multi-frame without a chosen frame, ..."""


# --- annotations -------------------------------------------------------------------------------
class AnnotationError(MammoSAEError):
    """An annotation file is missing columns, unparsable, or names unknown images."""

    exit_code = 4


# --- models and weights ------------------------------------------------------------------------
class CheckpointError(MammoSAEError):
    """A checkpoint file does not have the expected layout, keys or shapes."""

    exit_code = 5


class UnsafePickleError(CheckpointError):
    """A legacy pickled checkpoint was refused because trust_pickle was not given."""


class WeightsIntegrityError(CheckpointError):
    """A weights file does not match the sha256 recorded in its manifest."""


class BackboneRuntimeError(MammoSAEError):
    """A backbone runtime (ONNX Runtime) could not export, load or run the model; torch still can."""

    exit_code = 5


# --- pipeline ----------------------------------------------------------------------------------
class StoreError(MammoSAEError):
    """A feature store is missing, incomplete, corrupt, or does not match the model."""

    exit_code = 6


# --- verdicts and reading studies (labels/) ------------------------------------------------------
class LabelDatabaseError(StoreError):
    """The verdict database cannot be opened, read or written (the message says why and what to do)."""


class DatabaseAuthError(LabelDatabaseError):
    """The database server refused the login: wrong or missing password (never in the message)."""


class DatabaseUnavailableError(LabelDatabaseError):
    """The database server cannot be reached or dropped the connection (try again later)."""


class PermissionRefusedError(LabelDatabaseError):
    """The database refused an action the user's role may not do (another's name, update, delete)."""


class StudyError(MammoSAEError):
    """A reading study is unknown, badly specified, or the reader is not one of its readers."""

    exit_code = 7


class ConfigError(MammoSAEError):
    """A configuration value is invalid (unknown split, concept, dimension mismatch, ...)."""

    exit_code = 2


# --- PACS (DICOMweb) and DICOM export ----------------------------------------------------------
class PacsError(MammoSAEError):
    """A PACS could not be searched, read from or written to (messages carry no query values)."""

    exit_code = 9


class PacsConnectionError(PacsError):
    """The server could not be reached (refused, unknown host, TLS failure, timeout)."""


class PacsAuthError(PacsError):
    """The server wants credentials (HTTP 401), or refused the ones given."""


class PacsForbiddenError(PacsError):
    """The server refused the request for these credentials (HTTP 403)."""


class PacsNotFoundError(PacsError):
    """The study or instance is not on the server (HTTP 404, or an empty answer)."""


class PacsServerError(PacsError):
    """The server failed (HTTP 5xx)."""


class PacsResponseError(PacsError):
    """The server's answer is not valid DICOMweb (bad JSON, bad multipart, not DICOM)."""


class PacsTransferError(PacsError):
    """A retrieve was cut off mid-transfer; what arrived whole is cached, run it again to resume."""


class NoMammogramsError(PacsError):
    """The study holds no MG images."""


class StowRejectedError(PacsError):
    """The server did not store the exported objects; they stay on disk (``folder``)."""

    def __init__(self, message: str, folder: object = None) -> None:
        super().__init__(message)
        self.folder = folder


class ExportError(MammoSAEError):
    """An analysis could not be exported as DICOM (source header missing, nothing to export)."""

    exit_code = 10
