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


# --- pipeline ----------------------------------------------------------------------------------
class StoreError(MammoSAEError):
    """A feature store is missing, incomplete, corrupt, or does not match the model."""

    exit_code = 6


class ConfigError(MammoSAEError):
    """A configuration value is invalid (unknown split, concept, dimension mismatch, ...)."""

    exit_code = 2
