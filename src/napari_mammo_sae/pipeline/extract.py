"""``napari-mammo-sae extract``: a DICOM dataset + a model -> an HDF5 store of feature maps.

Each image of a VinDr-layout folder (``breast-level_annotations.csv``, ``finding_annotations.csv``,
``images/<study_id>/<image_id>.dicom``; real VinDr-Mammo or a phantom set) is read, preprocessed
(``mammoclip`` or ``robust``) and run through the backbone; its ``C x h x w`` feature map (fp16 by
default) goes to the store with an index row: image id, study id, SOPInstanceUID, laterality, view,
split, per-image labels of both concepts, and the geometry (JSON) that maps the feature grid back
to the DICOM pixels.

- Decoding and preprocessing run in DataLoader worker processes (``--workers``) while the model
  computes, so the backbone is the bottleneck.
- The backbone runs through a runtime (``--runtime``, models/runtime.py): ``auto`` is ONNX Runtime
  on a CPU (export cached per weights and size) and PyTorch on a GPU, there with pinned memory,
  non-blocking copies, channels_last and optional autocast (``--amp bf16|fp16``).
- Resumable: images already in the store are skipped. Atomic: the store only reads as complete
  once every selected image is stored (the store's completion flag is set last).
- Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) rank r extracts images i with i % world == r into
  ``STORE.rank<r>-of-<world>.h5``; the last rank to finish writes ``STORE`` as an index that joins
  the shards (readers open it like a single store).

Exit codes: 2 unknown split / preprocessing / bad size (ConfigError); 4 annotation files missing
or unreadable (AnnotationError); 5 weights unreadable (CheckpointError); 6 a store made with another
backbone or preprocessing at the output path (StoreError).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.folders import backbone_signature, load_classifier
from .dataset import (
    PreprocessedImages,
    list_images,
    make_loader,
    parse_size,
    resolve_device,
)
from .store import join_shards

log = logging.getLogger(__name__)


# --- models ----------------------------------------------------------------------------------
def backbone_name(model: Any, config: dict) -> str:
    """The backbone's architecture name as recorded in its config (or the timm default_cfg)."""
    for key in ("backbone", "backbone_name", "architecture"):
        if isinstance(config.get(key), str):
            return config[key]
    prov = config.get("provenance")
    if isinstance(prov, dict) and isinstance(prov.get("backbone"), str):
        return prov["backbone"]
    bb = getattr(model, "backbone", model)
    cfg = getattr(bb, "pretrained_cfg", None) or getattr(bb, "default_cfg", None) or {}
    return str(cfg.get("architecture", type(bb).__name__))


# --- extraction --------------------------------------------------------------------------------
@dataclass
class ExtractResult:
    """What an extraction did."""

    path: Path
    stored: int
    skipped_existing: int
    unreadable: list[str]
    seconds: float
    complete: bool
    #: (images, seconds) of the run after its first batch: the steady state, without the loader
    #: workers' start-up and the first decode that nothing can overlap
    steady: tuple[int, float] = (0, 0.0)
    runtime: str = ""  # the backbone runtime that ran: "onnx" or "torch"

    @property
    def images_per_second(self) -> float:
        """Throughput of the images computed in this run (start-up included)."""
        return self.stored / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_images_per_second(self) -> float:
        """Throughput after the first batch (what a dataset-scale run sustains)."""
        n, s = self.steady
        return n / s if n and s > 0 else float("nan")


def distributed_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment variables; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard_path(out: Path, rank: int, world: int) -> Path:
    """The file rank ``rank`` writes under torchrun."""
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix}")


def extract_features(
    data_dir: str | Path,
    model: Any,
    out: str | Path,
    *,
    config: dict | None = None,
    split: str | None = None,
    limit: int | None = None,
    workers: int = 0,
    dtype: str = "float16",
    preprocess: str = "mammoclip",
    input_size: tuple[int, int] | str | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    rank: int = 0,
    world: int = 1,
    progress: Any = None,
    stop_after: int | None = None,
    on_batch: Callable[[int], None] | None = None,
    runtime: str | None = "auto",
    amp: str = "float32",
    hook: str | None = None,
) -> ExtractResult:
    """Extract feature maps of a dataset into a store (resumable, atomic); returns what it did.

    ``stop_after`` stores at most that many images and leaves the store incomplete (tests and
    interrupted runs look the same). ``runtime`` (auto | torch | onnx) runs the backbone;
    ``amp`` (float32 | bfloat16 | float16) is the autocast dtype of the torch runtime on a GPU.
    ``hook`` is the backbone layer whose activations are stored (``models.backbone`` hook points:
    head (default, ``forward_features``), stageN, blocks.i, blocks.i.j); the store records it.
    """
    import torch

    from ..progress import check_cancelled
    from . import store as feature_store

    if dtype not in ("float16", "float32"):
        raise ConfigError(f"unknown feature dtype {dtype!r}: use float16 or float32")
    size = parse_size(input_size)
    items = list_images(data_dir, split=split, limit=limit)
    if world > 1:
        items = [it for i, it in enumerate(items) if i % world == rank]
    out = Path(out)
    path = shard_path(out, rank, world) if world > 1 else out
    device = resolve_device(device)
    model = model.to(device).eval()
    config = dict(config or {})
    attrs = {
        "backbone": backbone_name(model, config),
        "backbone_signature": backbone_signature(model),
        "preprocess": preprocess,
        "input_size": list(size),
        "feature_dtype": dtype,
        "weights_source": str(config.get("source") or config.get("name") or ""),
    }
    from ..models.runtime import create_runtime

    if amp != "float32" and not device.startswith("cuda"):
        raise ConfigError(f"--amp {amp} is for GPUs (very slow on CPUs): use float32")
    backbone = getattr(model, "backbone", model)
    backbone = backbone if isinstance(backbone, torch.nn.Module) else model
    from ..models.backbone import at_hook, resolve_hook

    attrs["hook"] = resolve_hook(backbone, hook).name if hook not in (None, "", "head") else "head"
    backbone = at_hook(backbone, attrs["hook"])
    run_backbone = create_runtime(
        backbone, runtime, size=size, device=device, dtype=amp, progress=progress
    )
    if progress is not None:
        progress.set_description(f"extract ({run_backbone.name})")
    # feature shape from one dry forward (cheap, and it checks the model runs at this size)
    probe = run_backbone(torch.zeros(1, 3, *size))
    c, h, w = (int(v) for v in probe.shape[1:])
    signature = attrs.pop("backbone_signature")
    store = feature_store.create(
        path,
        feature_dim=c,
        grid=(h, w),
        backbone_signature=signature,
        dtype=dtype,
        attrs=attrs,
        n_expected=len(items),
    )
    done = store.image_ids
    todo = [it for it in items if it.image_id not in done]
    skipped = len(items) - len(todo)
    if progress is not None:
        progress.set_total(len(items))
        progress.update(skipped)
    dataset = PreprocessedImages(todo, preprocess, size)
    loader = make_loader(
        dataset, batch_size=batch_size, workers=workers, pin_memory=device.startswith("cuda")
    )
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    stored, unreadable = 0, []
    t0 = time.perf_counter()
    t_first, n_first = None, 0
    try:
        for batch in loader:
            check_cancelled(progress)
            if batch is None:
                continue
            idx, images, geoms, uids = batch
            feats = run_backbone(images)  # pinned batches go to a GPU without blocking
            feats = feats.to(torch_dtype).cpu().numpy()
            rows = []
            for k, i in enumerate(idx):
                it = todo[i]
                rows.append(
                    {
                        "image_id": it.image_id,
                        "study_id": it.study_id,
                        "sop_instance_uid": uids[k],
                        "split": it.split,
                        "laterality": it.laterality,
                        "view": it.view,
                        "density": it.density,
                        "label_mass": it.labels["mass"],
                        "label_calcification": it.labels["calcification"],
                        "geometry": geoms[k],
                    }
                )
            store.append_many(feats, rows)
            stored += len(rows)
            if t_first is None:
                t_first, n_first = time.perf_counter(), stored
            if progress is not None:
                progress.update(len(rows))
            if on_batch is not None:
                on_batch(stored)
            if stop_after is not None and stored >= stop_after:
                break
        t_end = time.perf_counter()
        seconds = t_end - t0
        steady = (stored - n_first, t_end - t_first) if t_first is not None else (0, 0.0)
        seen = {it.image_id for it in todo[: len(dataset)]}
        unreadable = sorted(seen - store.image_ids - done) if stop_after is None else []
        complete = stop_after is None or stored + skipped >= len(items)
    except BaseException:
        store.close(complete=False)
        raise
    store.close(complete=complete, n_unreadable=len(unreadable))
    result = ExtractResult(
        path, stored, skipped, unreadable, seconds, complete, steady, run_backbone.name
    )
    if world > 1 and complete:
        join_shards(out, [shard_path(out, r, world) for r in range(world)])
    return result


# --- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``napari-mammo-sae extract``."""
    parser.add_argument(
        "--data", required=True, help="dataset folder (VinDr layout: real or phantom)"
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="classifier weights folder (train-head output)")
    src.add_argument("--mammoclip-checkpoint", help="Mammo-CLIP downstream classifier .pth")
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="allow unpickling a legacy Mammo-CLIP checkpoint (only for files you trust)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output store (.h5)")
    parser.add_argument("--split", help="only this split (training | test); default: all")
    parser.add_argument("--limit", type=int, help="at most this many images (before sharding)")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader decode/preprocess workers"
    )
    parser.add_argument(
        "--dtype", default="fp16", choices=("fp16", "fp32"), help="stored feature dtype"
    )
    parser.add_argument("--preprocess", default="mammoclip", choices=("mammoclip", "robust"))
    parser.add_argument(
        "--input-size", help="model input HxW (default 1520x912 or the weights' own)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument(
        "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ..."
    )
    parser.add_argument(
        "--runtime", default="auto", choices=("auto", "torch", "onnx"),
        help="what runs the backbone: auto = ONNX Runtime on a CPU, PyTorch on a GPU",
    )  # fmt: skip
    parser.add_argument(
        "--amp", default="fp32", choices=("fp32", "bf16", "fp16"),
        help="GPU autocast dtype of the backbone (torch runtime); fp32 on CPUs",
    )  # fmt: skip
    parser.add_argument(
        "--hook", default="head",
        help="backbone layer to store: head (the last layer, default), stageN (timm feature stage "
        "N, e.g. stage3 = stride 16), blocks.i or blocks.i.j",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``extract`` from parsed arguments; returns the exit status."""
    from ..progress import TqdmProgress

    model, config = load_classifier(
        args.weights, args.mammoclip_checkpoint, trust_pickle=args.trust_pickle
    )
    size = args.input_size or _config_size(config)
    rank, world = distributed_env()
    progress = TqdmProgress(
        desc=f"extract{f' rank {rank}' if world > 1 else ''}", disable=rank != 0
    )
    try:
        result = extract_features(
            args.data,
            model,
            args.out,
            config=config,
            split=args.split,
            limit=args.limit,
            workers=args.workers,
            dtype="float16" if args.dtype == "fp16" else "float32",
            preprocess=args.preprocess,
            input_size=size,
            batch_size=args.batch_size,
            device=args.device,
            rank=rank,
            world=world,
            progress=progress,
            runtime=args.runtime,
            amp={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.amp],
            hook=args.hook,
        )
    finally:
        progress.close()
    msg = (
        f"{result.path}: {result.stored} images stored ({result.images_per_second:.2f}/s, "
        f"backbone runtime {result.runtime}), "
        f"{result.skipped_existing} already there"
    )
    if result.unreadable:
        msg += f", {len(result.unreadable)} unreadable (see the log)"
    print(msg)
    return 0


def _config_size(config: dict) -> tuple[int, int] | None:
    for src in (config, config.get("provenance") or {}):
        size = src.get("input_size") if isinstance(src, dict) else None
        if size:
            return tuple(size)  # type: ignore[return-value]
    return None
