"""npe2 reader for DICOM mammograms (``*.dcm``, ``*.dicom``) and folders of them.

Each image becomes one image layer named by laterality and view (``"R CC"``), in millimetres
(``scale`` = pixel spacing, ``units`` = mm), grey colormap, contrast limits from the file's window
(MONOCHROME1 already inverted so dense tissue is bright), and metadata with the UIDs, laterality, view,
spacing and where each came from - never patient data. Every image, a lone file included, hangs by
:func:`napari_mammo_sae.layout.hanging_layout`: right breasts on the viewer's left, left breasts on the
right, CC row above MLO row, chest walls toward the middle (mirrored when needed). Overlays must follow
the same placement: ``layer.metadata["placement"].transform(scale, translate)`` (see ``layout.py``);
``layer.metadata["record"]`` is the :class:`~napari_mammo_sae.dicom.MammogramRecord` for analysis.

Bad files never raise into the viewer: the typed error's message is shown as a napari notification and
the file yields no layer (a folder keeps its readable files).

napari's built-in reader (imageio) also claims ``*.dcm``/``*.dicom`` and cannot decode compressed
(RLE, JPEG, JPEG 2000) files. How to get this reader, as verified with napari 0.9.2:

* in scripts and tests: ``viewer.open(path, plugin="napari-mammo-sae")``. Note that ``viewer.open``
  defaults to ``plugin="napari"`` (the built-in reader) and ignores the preference below unless you
  pass ``plugin=None``;
* from the shell: ``napari --plugin napari-mammo-sae exam.dcm`` (or a folder);
* File > Open and drag-and-drop: napari asks which reader to use and offers to remember the choice;
  or set it once under Preferences > Plugins > "File extension readers", or in Python
  ``napari.settings.get_settings().plugins.extension2reader["*.dcm"] = "napari-mammo-sae"`` (and
  ``"*.dicom"``); these preferences apply to the GUI and to ``viewer.open(path, plugin=None)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..dicom import MammogramRecord, read_directory_with_errors, read_mammogram
from ..errors import DicomReadError
from ..layout import Placement, hanging_layout

logger = logging.getLogger(__name__)

PLUGIN_NAME = "napari-mammo-sae"
SUFFIXES = (".dcm", ".dicom")

LayerDataTuple = tuple[Any, dict, str]


def _folder_has_dicom(folder: Path, max_probe: int = 20) -> bool:
    """True when a folder holds *.dcm/*.dicom files or extension-less files with the DICM prefix."""
    from ..dicom import has_dicm_prefix

    probed = 0
    try:
        for entry in folder.iterdir():
            if not entry.is_file() or entry.name.startswith("."):
                continue
            suffix = entry.suffix.lower()
            if suffix in SUFFIXES:
                return True
            if suffix == "" and probed < max_probe:
                probed += 1
                if has_dicm_prefix(entry):
                    return True
    except OSError:
        return False
    return False


def _accepts(path: str | Path) -> bool:
    p = Path(path)
    if p.is_dir():
        return _folder_has_dicom(p)
    return p.suffix.lower() in SUFFIXES


def napari_get_reader(path: str | Sequence[str]) -> Callable[[Any], list] | None:
    """Return the DICOM reader for .dcm/.dicom files and folders holding DICOM files, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_accepts(p) for p in paths):
        return None
    return read_dicom


def notify_error(message: str) -> None:
    """Show an error notification in the viewer (logged when napari cannot show it)."""
    try:
        from napari.utils.notifications import show_error

        show_error(message)
    except Exception:  # pragma: no cover - no napari/Qt: log instead of crashing
        logger.error("%s", message)


def read_records(path: str | Path | Sequence[str | Path]) -> list[MammogramRecord]:
    """Read files/folders into records; each typed error becomes a notification, not an exception."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    records: list[MammogramRecord] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found, errors = read_directory_with_errors(p)
            records += found
            for _name, exc in errors:
                notify_error(str(exc))  # the message starts with the file name
            if not found and not errors:
                notify_error(
                    f"{p.name} holds no DICOM files (.dcm, .dicom); open a folder of mammograms."
                )
            continue
        try:
            records.append(read_mammogram(p))
        except DicomReadError as exc:
            notify_error(str(exc))
        except Exception as exc:  # never a traceback in the viewer
            logger.exception("unexpected error reading %s", p.name)
            notify_error(
                f"{p.name}: unexpected {type(exc).__name__} while reading; please report it."
            )
    return records


def layer_metadata(placement: Placement) -> dict:
    """Layer metadata: UIDs, laterality, view, spacing and their sources (no patient data)."""
    rec = placement.record
    return {
        "source_file": rec.source,
        "sop_instance_uid": rec.sop_instance_uid,
        "study_instance_uid": rec.study_instance_uid,
        "series_instance_uid": rec.series_instance_uid,
        "laterality": rec.laterality,
        "laterality_source": rec.laterality_source,
        "view": rec.view,
        "view_source": rec.view_source,
        "spacing_mm": tuple(rec.spacing_mm),
        "spacing_source": rec.spacing_source,
        "photometric": rec.photometric,
        "window": None
        if rec.window is None
        else {
            "center": rec.window.center,
            "width": rec.window.width,
            "function": rec.window.function,
            "source": rec.window.source,
        },
        "frame": rec.frame,
        "transfer_syntax": rec.transfer_syntax,
        "flipped": placement.flip,
        "chest_wall": placement.chest_wall,
        "chest_wall_source": placement.chest_wall_source,
        "placement": placement,
        "record": rec,
    }


def layer_data_tuples(
    records: Sequence[MammogramRecord], gap_mm: float | None = None
) -> list[LayerDataTuple]:
    """Image layer data tuples for records, placed in the hanging layout.

    The default gap is 10 mm, or 2 % of the widest image when that is larger (files without pixel
    spacing are laid out in pixels, where 10 "mm" would be invisible).
    """
    if gap_mm is None:
        widest = max((r.shape[1] * r.spacing_mm[1] for r in records), default=0.0)
        gap_mm = max(10.0, 0.02 * widest)
    out: list[LayerDataTuple] = []
    for placement in hanging_layout(records, gap_mm=gap_mm):
        rec = placement.record
        out.append(
            (
                rec.display_pixels(),
                {
                    "name": rec.name,
                    **placement.layer_kwargs(),
                    "units": ("mm", "mm"),
                    "contrast_limits": list(rec.display_limits()),
                    "colormap": "gray",
                    "metadata": layer_metadata(placement),
                },
                "image",
            )
        )
    return out


def read_dicom(path: str | Sequence[str]) -> list:
    """Reader function: layer data tuples, or napari's empty sentinel when nothing could be read."""
    records = read_records(path)
    if not records:
        return [(None,)]  # napari: the reader handled the path and opened no layer
    _install_workstation()
    return layer_data_tuples(records)


def _install_workstation() -> None:
    """Bind the workstation viewing (window/level, magnifier, view keys: ``viewing.py``) in the
    viewer opening these files, so it works without any dock open."""
    try:
        import napari

        viewer = napari.current_viewer()
        if viewer is not None:
            from .viewing import install

            install(viewer)
    except Exception:  # noqa: BLE001 - viewing habits must never stop a file from opening
        logger.exception("workstation viewing not installed")
