"""``napari-mammo-sae phantom``: write a synthetic VinDr-Mammo-like dataset with known truth.

Exit statuses: 0 done; 2 bad options (ConfigError); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os

from . import SIZES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The phantom subcommand's options."""
    parser.add_argument("--out", required=True, help="output folder (VinDr-Mammo layout)")
    parser.add_argument("--studies", type=int, default=10, help="studies (4 images each)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="full",
        help="small 448x368 @0.6 mm, medium 1400x1150 @0.2 mm, full 2800x2300 @0.1 mm",
    )  # fmt: skip
    parser.add_argument("--height", type=int, help="rows (overrides --size)")
    parser.add_argument("--width", type=int, help="columns (overrides --size)")
    parser.add_argument("--spacing", type=float, help="pixel spacing in mm (overrides --size)")
    parser.add_argument("--bits", type=int, default=12, choices=(12, 13, 14), help="bits stored")
    parser.add_argument(
        "--photometric", choices=("MONOCHROME2", "MONOCHROME1"), default="MONOCHROME2"
    )
    parser.add_argument("--compression", choices=("none", "rle", "jpeg2000"), default="none")
    parser.add_argument(
        "--mass-rate", type=float, default=0.055, help="share of images with a mass (VinDr 0.055)"
    )
    parser.add_argument(
        "--calc-rate", type=float, default=0.028,
        help="share of images with suspicious calcifications (VinDr 0.028)",
    )  # fmt: skip
    parser.add_argument(
        "--balanced", action="store_true", help="half the images positive for each concept"
    )
    parser.add_argument(
        "--min-positives", type=int, default=1,
        help="at least this many positive breasts per concept in each split (default 1)",
    )  # fmt: skip
    parser.add_argument("--no-confounder", action="store_true", help="do not plant the marker")
    parser.add_argument(
        "--cue-concept", choices=("calcification", "mass"), default="calcification",
        help="the concept the marker is correlated with in training (default calcification)",
    )  # fmt: skip
    parser.add_argument(
        "--cue-pos-rate", type=float, default=0.6, help="marker rate, positive training images"
    )
    parser.add_argument(
        "--cue-neg-rate", type=float, default=0.05, help="marker rate, negative training images"
    )
    parser.add_argument(
        "--cue-test-rate", type=float, default=0.3, help="marker rate, every test image"
    )
    parser.add_argument(
        "--cue", action="append", default=[], metavar="NAME[@CONCEPT][:POS,NEG,TEST]",
        help="add a realistic shortcut (repeatable): lead (lead triangle on the skin near a mass; "
        "default mass:0.6,0.05,0.3), clip (biopsy clip in the breast; calcification:0.6,0.05,0.3), "
        "site (one site's processing and burned-in text, decided per study; mass:0.6,0.15,0.3). "
        "POS/NEG: rates in positive/negative training images, TEST: rate in every test image",
    )  # fmt: skip
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, help="share of studies in the test split"
    )
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """PhantomConfig from parsed options."""
    from .cues import parse_cue
    from .dataset import PhantomConfig

    h, w, sp = SIZES[args.size]
    mass, calc = args.mass_rate, args.calc_rate
    if args.balanced:
        mass = calc = 0.5
    return PhantomConfig(
        studies=args.studies, seed=args.seed, height=args.height or h, width=args.width or w,
        spacing_mm=args.spacing or sp, bits_stored=args.bits, photometric=args.photometric,
        compression=None if args.compression == "none" else args.compression,
        mass_rate=mass, calc_rate=calc, min_positives=args.min_positives,
        confounder=not args.no_confounder, cue_concept=args.cue_concept,
        cue_pos_rate=args.cue_pos_rate, cue_neg_rate=args.cue_neg_rate,
        cue_test_rate=args.cue_test_rate, test_fraction=args.test_fraction,
        cues=tuple(parse_cue(text) for text in args.cue),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print a one-line JSON summary."""
    from ..progress import TqdmProgress
    from .dataset import write_dataset

    cfg = config_from_args(args)
    cfg.validate()
    progress = TqdmProgress(total=cfg.studies * 4, desc="phantom", disable=args.quiet)
    try:
        summary = write_dataset(cfg, args.out, workers=args.workers, progress=progress)
    finally:
        progress.close()
    print(json.dumps(summary))
    return 0
