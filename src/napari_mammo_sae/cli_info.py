"""``napari-mammo-sae info FILE_OR_DIR...``: what the reader sees in DICOM files, never patient data.

Per image: laterality and view with the tag each came from, size, spacing, photometric interpretation,
window, transfer syntax, chest wall side and the UIDs. Files that fail are reported with their typed error
on stderr; the exit status is 0 when every file was read, else the error's exit code (3 for DICOM errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``info`` arguments."""
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="DICOM files or folders")
    parser.add_argument(
        "--frame",
        type=int,
        default=None,
        help="frame index (0-based) for multi-frame objects such as tomosynthesis",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per image, as a list")


def describe(record) -> dict:
    """A JSON-ready summary of a record (no pixel data, no patient data)."""
    from .dicom import chest_wall_side

    low, high = record.display_limits()
    window = record.window
    side, side_source = chest_wall_side(record)
    return {
        "file": record.source,
        "name": record.name,
        "laterality": record.laterality,
        "laterality_source": record.laterality_source,
        "view": record.view,
        "view_source": record.view_source,
        "rows": record.shape[0],
        "columns": record.shape[1],
        "frame": record.frame,
        "number_of_frames": record.number_of_frames,
        "spacing_mm": list(record.spacing_mm),
        "spacing_source": record.spacing_source,
        "photometric": record.photometric,
        "bits_stored": record.bits_stored,
        "window": None
        if window is None
        else {
            "center": window.center,
            "width": window.width,
            "function": window.function,
            "source": window.source,
        },
        "display_limits": [low, high],
        "chest_wall": side,
        "chest_wall_source": side_source if side else "unknown",
        "transfer_syntax": record.transfer_syntax,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "modality": record.modality,
        "sop_class": record.sop_class,
        "sop_instance_uid": record.sop_instance_uid,
        "study_instance_uid": record.study_instance_uid,
        "series_instance_uid": record.series_instance_uid,
        "notes": list(record.notes),
    }


def _format(info: dict) -> str:
    w = info["window"]
    window = (
        f"center {w['center']:g}, width {w['width']:g}, {w['function']} (from {w['source']})"
        if w
        else "none in the file (display uses min/max)"
    )
    frame = (
        f", frame {info['frame']} of {info['number_of_frames']}"
        if info["frame"] is not None
        else ""
    )
    sy, sx = info["spacing_mm"]
    lines = [
        f"{info['file']}: {info['name']}",
        f"  laterality     {info['laterality'] or '?'} (from {info['laterality_source']})",
        f"  view           {info['view'] or '?'} (from {info['view_source']})",
        f"  size           {info['rows']} x {info['columns']} pixels (rows x columns){frame}",
        f"  spacing        {sy:g} x {sx:g} mm (from {info['spacing_source']})",
        f"  photometric    {info['photometric']}, {info['bits_stored']} bits stored",
        f"  window         {window}",
        f"  display limits {info['display_limits'][0]:g} .. {info['display_limits'][1]:g}",
        f"  chest wall     {info['chest_wall'] or '?'} edge (from {info['chest_wall_source']})",
        f"  transfer       {info['transfer_syntax']} ({info['transfer_syntax_uid']})",
        f"  modality       {info['modality'] or '?'}, {info['sop_class'] or '?'}",
        f"  SOP instance   {info['sop_instance_uid']}",
        f"  study          {info['study_instance_uid']}",
        f"  series         {info['series_instance_uid']}",
    ]
    lines += [f"  note           {n}" for n in info["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print what the reader sees; return 0, or the exit code of the first typed error."""
    from .dicom import read_directory_with_errors, read_mammogram
    from .errors import DicomReadError

    infos: list[dict] = []
    failures: list[tuple[str, DicomReadError]] = []
    for raw in args.paths:
        path = Path(raw)
        if path.is_dir():
            records, errors = read_directory_with_errors(path)
            infos += [describe(r) for r in records]
            failures += errors
            if not records and not errors:
                failures.append(
                    (path.name, DicomReadError(f"{path.name} holds no DICOM files (.dcm, .dicom)."))
                )
            continue
        try:
            infos.append(describe(read_mammogram(path, frame=args.frame)))
        except DicomReadError as exc:
            failures.append((path.name, exc))
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print("\n\n".join(_format(i) for i in infos))
    for name, exc in failures:
        print(f"napari-mammo-sae info: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return failures[0][1].exit_code if failures else 0
