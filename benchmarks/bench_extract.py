"""`extract` images/s versus the bare backbone forward rate, same machine, model and input size.

The bare rate is the backbone run by the same runtime as ``extract`` (``--runtime``, default auto:
ONNX Runtime on a CPU) on a ready tensor (no DICOM decode, no preprocessing, no store writes);
``extract`` does all of those, with decoding/preprocessing in DataLoader workers.
Target: extract >= 0.9 x bare.

Usage::

    .venv/bin/python benchmarks/bench_extract.py [--backbone tf_efficientnet_b0] [--size 1520x912]
        [--images 12] [--workers 1] [--threads 2]

Prints both rates and their ratio. A phantom dataset is generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tf_efficientnet_b0")
    ap.add_argument("--size", default="1520x912")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from napari_mammo_sae.cli import main as cli
    from napari_mammo_sae.pipeline.dataset import parse_size
    from napari_mammo_sae.pipeline.extract import extract_features
    from napari_mammo_sae.pipeline.head_training import build_classifier

    size = parse_size(args.size)
    model = build_classifier(args.backbone).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        studies = max(1, (args.images + 3) // 4)
        try:
            rc = cli(["phantom", "--out", str(data), "--studies", str(studies), "--seed", "0"])
        except SystemExit:  # no phantom subcommand in this build: plain synthetic DICOMs
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from test_extract import write_vindr_dataset

            write_vindr_dataset(data, studies=studies + 1, shape=(2800, 2300))
            rc = 0
        if rc:
            print("phantom generation failed", file=sys.stderr)
            return 1

        from napari_mammo_sae.models.runtime import create_runtime

        forward = create_runtime(model.backbone, args.runtime, size=size, device="cpu")
        x = torch.randn(args.batch_size, 3, *size)
        forward(x)  # warm-up
        t0 = time.perf_counter()
        n = 0
        while n < args.images:
            forward(x)
            n += args.batch_size
        bare = n / (time.perf_counter() - t0)

        result = extract_features(
            data,
            model,
            Path(tmp) / "store.h5",
            limit=args.images,
            workers=args.workers,
            input_size=size,
            batch_size=args.batch_size,
            device="cpu",
            runtime=args.runtime,
        )
        rate = result.images_per_second
        steady = result.steady_images_per_second
    print(f"backbone {args.backbone}, input {size[0]}x{size[1]}, batch {args.batch_size}, "
          f"torch threads {args.threads}, loader workers {args.workers}, {args.images} images")  # fmt: skip
    print(f"bare forward_features ({forward.name} runtime): {bare:.3f} images/s")
    print(f"extract (decode + preprocess + forward + fp16 store): {rate:.3f} images/s")
    print(f"ratio extract / bare: {rate / bare:.3f} (target >= 0.9)")
    print(f"after the first batch (loader start-up excluded): {steady:.3f} images/s, "
          f"ratio {steady / bare:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
