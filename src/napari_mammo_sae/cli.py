"""The ``napari-mammo-sae`` command: thin adapters over the core, one module per subcommand.

Each subcommand lives in its own module that exposes ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (torch, h5py) happen inside ``run`` so ``--help`` is quick.
Nothing on this path imports Qt or napari.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import MammoSAEError

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": (
        "napari_mammo_sae.cli_info",
        "show what the reader sees in DICOM files (no patient data)",
    ),
    "phantom": (
        "napari_mammo_sae.phantom.cli",
        "write a synthetic VinDr-Mammo-like dataset with known truth",
    ),
    "extract": (
        "napari_mammo_sae.pipeline.extract",
        "extract backbone feature maps into an HDF5 store",
    ),
    "train": (
        "napari_mammo_sae.pipeline.train_sae",
        "train a sparse autoencoder on a feature store",
    ),
    "train-head": (
        "napari_mammo_sae.pipeline.train_head",
        "train a concept head (linear probe or fine-tune)",
    ),
    "probe": ("napari_mammo_sae.pipeline.probe", "class-wise mean latents and neuron rankings"),
    "evaluate": (
        "napari_mammo_sae.pipeline.evaluate",
        "the paper's analyses on the test split, as a report",
    ),
    "shortcuts": (
        "napari_mammo_sae.pipeline.shortcuts",
        "the shortcut report: reliance on each planted cue, cue neurons, switching them off",
    ),
    "study": (
        "napari_mammo_sae.labels.cli",
        "multi-reader labelling studies: create, status, export (SQLite or PostgreSQL)",
    ),
    "pacs": (
        "napari_mammo_sae.pacs.cli",
        "search and retrieve mammography studies on a DICOMweb PACS",
    ),
    "export": (
        "napari_mammo_sae.export_cli",
        "export analyses as DICOM (Segmentation, SR, Secondary Capture), optionally to a PACS",
    ),
}

#: exit statuses, documented in the README
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand.

    A subcommand whose module fails to import is not dropped: the ImportError surfaces as it is (a
    typo in an internal import must not turn into a missing subcommand).
    """
    parser = argparse.ArgumentParser(
        prog="napari-mammo-sae",
        description="Mammo-SAE: sparse-autoencoder interpretability for mammography models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .hugepages import avoid_hugepage_stalls

    avoid_hugepage_stalls()  # extract, evaluate and export read many mammograms
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args._run(args) or 0)
    except MammoSAEError as exc:
        print(f"napari-mammo-sae {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"napari-mammo-sae {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
