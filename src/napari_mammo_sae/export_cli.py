"""``napari-mammo-sae export FILE_OR_FOLDER... --weights ... --out DIR [--stow URL]``.

Analyses each mammogram with a classifier and an SAE and writes, per image, a FRACTIONAL
Segmentation of the top neurons' maps, a Comprehensive SR and a "not for diagnosis" Secondary
Capture, in new series of the source study (see :mod:`napari_mammo_sae.dicom_export`). With
``--stow`` they are sent to the PACS; if the PACS refuses, they stay in ``--out`` and the error
says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``export`` arguments."""
    parser.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER", help="DICOM mammograms")
    parser.add_argument(
        "--weights",
        type=Path,
        help="classifier weights folder (train-head); default: the bundled finetuned "
        "calcification model",
    )
    parser.add_argument("--sae", type=Path, help="SAE weights folder (default: the bundled SAE)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the DICOM objects")
    parser.add_argument("--top", type=int, default=5, help="neurons in the segmentation (5)")
    parser.add_argument("--device", default="auto", help="torch device (auto)")
    parser.add_argument(
        "--labels",
        metavar="DB",
        help="verdict database (file or postgresql:// URL) whose verdicts on the SAE's neurons go "
        "into the report",
    )
    parser.add_argument(
        "--boxes",
        type=Path,
        metavar="CSV",
        help="finding boxes (path or SOPInstanceUID, xmin, ymin, xmax, ymax, label; original "
        "pixels): each neuron's box agreement goes into the report",
    )
    parser.add_argument("--stow", metavar="URL", help="send the objects to this DICOMweb root")
    parser.add_argument("--user", help="user name for the STOW server (basic authentication)")
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the STOW server's TLS certificate"
    )


def _files(paths: list[str]) -> list[Path]:
    from .dicom import has_dicm_prefix

    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and has_dicm_prefix(f))
        else:
            out.append(p)
    return out


def identity_of(classifier: Path, sae: Path, config: dict):
    """ModelIdentity of two weights folders (names and sha256 of their safetensors)."""
    from .dicom_export import ModelIdentity
    from .models.weights import sha256_file

    def digest(folder: Path) -> str:
        f = folder / "model.safetensors" if folder.is_dir() else folder
        return sha256_file(f) if f.exists() else ""

    return ModelIdentity(
        classifier=classifier.name,
        classifier_sha256=digest(classifier),
        sae=sae.name,
        sae_sha256=digest(sae),
        concept=str(config.get("concept") or "calcification"),
        preprocess=str(config.get("preprocess") or "mammoclip"),
    )


def _box_agreement(analysis, neurons, boxes, path: Path, uid: str) -> dict[int, float]:
    """IoU of each neuron's map with this image's boxes from a box CSV ({} when it has none)."""
    from .analysis.localisation import box_agreement

    mine = [
        b.box
        for b in boxes
        if b.sop_instance_uid == uid or (b.path is not None and b.path.resolve() == path.resolve())
    ]
    if not mine:
        return {}
    maps = analysis.latent_maps(neurons)
    return {
        int(n): box_agreement(m, mine, analysis.geometry).iou
        for n, m in zip(neurons, maps, strict=True)
        if m.max() > 0
    }


def run(args: argparse.Namespace) -> int:
    from .annotations import load_box_csv
    from .dicom import read_mammogram
    from .dicom_export import ExportInput, export_analysis, stow, verdicts_from_store
    from .errors import ConfigError, DicomReadError
    from .models.inference import Analyzer
    from .models.weights import bundled_weights_dir

    root = bundled_weights_dir()
    classifier = args.weights or (root / "finetuned-calcification" if root else None)
    sae = args.sae or (root / "sae-finetuned-calcification" if root else None)
    if classifier is None or sae is None or not classifier.exists() or not sae.exists():
        raise ConfigError("give --weights (classifier folder) and --sae (SAE folder)")
    analyzer = Analyzer.from_weights(classifier, sae, device=args.device)
    config_file = Path(classifier) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    identity = identity_of(classifier, sae, config)
    files = _files(args.paths)
    if not files:
        raise ConfigError("no DICOM files among the paths given")
    boxes = load_box_csv(args.boxes) if args.boxes else []
    results, failed = [], 0
    for f in files:
        try:
            record = read_mammogram(f)
        except DicomReadError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            failed += 1
            continue
        analysis = analyzer.analyse(record)
        neurons = [int(n) for n in analysis.top_neurons(args.top)]
        verdicts = (
            verdicts_from_store(args.labels, identity.sae_sha256, neurons) if args.labels else {}
        )
        res = export_analysis(
            ExportInput(
                f, analysis, identity, neurons=neurons, verdicts=verdicts, record=record,
                box_iou=_box_agreement(analysis, neurons, boxes, f, record.sop_instance_uid),
            ),
            args.out,
        )  # fmt: skip
        results.append(res)
        print(f"{record.name}: {', '.join(p.name for p in res.paths)}")
    print(f"{len(results)} images exported to {args.out}")
    if args.stow and results:
        from .pacs.client import PacsClient
        from .pacs.settings import server_from_settings

        server = server_from_settings(
            args.stow, args.user, insecure=True if args.insecure else None
        )
        client = PacsClient(server)
        try:
            n = stow(results, client)
        finally:
            client.close()
        print(f"{n} objects stored on {server.name}")
    return 3 if failed else 0
