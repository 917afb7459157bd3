"""``napari-mammo-sae probe``: class-wise mean latents, neuron rankings and top-activating images.

Over the training split of a feature store, every image's feature map is encoded by the SAE and
averaged over positions; the class-wise means of these pooled latents are the paper's equation 2.
Neurons are ranked per class by three scores (``analysis/ranking.py``): the class mean (the paper),
the class-centred mean (class mean - overall mean, as in the paper's released rank files) and the
logit contribution through the concept head. For each top neuron the images (any split) where it
fires most strongly are kept with the feature cell of the maximum, for the GUI's neuron gallery.

Output: one ``.npz`` file (no pickles) holding the arrays and a JSON header with the SAE's sha256,
so the GUI can find the probe that belongs to the SAE it has loaded (:func:`find_probe`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.interventions import head_parts
from ..analysis.ranking import ClassMeans, RankingTable, rank_scores
from ..errors import ConfigError, StoreError
from .dataset import CONCEPTS

log = logging.getLogger(__name__)

PROBE_FORMAT = "napari-mammo-sae/probe/1"


# --- SAE and head access (plain tensors; works for any module with the contract's names) --------
def sae_parts(sae: Any) -> tuple[Any, Any, Any, Any]:
    """(W_enc (m, d), b_enc (m,), W_dec (d, m), b_dec (d,)) of an SAE, detached."""
    return (sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach())


def sae_dims(sae: Any) -> tuple[int, int]:
    """(d_in, d_latent) of an SAE."""
    m, d = sae.W_enc.shape
    return int(d), int(m)


def _sae_is_relu(sae: Any) -> bool:
    kind = (
        getattr(sae, "kind", None) or getattr(getattr(sae, "config", None), "kind", None) or "relu"
    )
    return str(kind) == "relu"


def encode_latents(sae: Any, tokens: Any, neurons: Any = None) -> Any:
    """SAE latents of ``tokens`` (T, d); with ``neurons`` only those columns (cheap for ReLU SAEs)."""
    import torch

    if neurons is None or not _sae_is_relu(sae):
        z = sae.encode(tokens)
        return z if neurons is None else z[:, torch.as_tensor(neurons, dtype=torch.long)]
    W_enc, b_enc, _, b_dec = sae_parts(sae)
    idx = torch.as_tensor(neurons, dtype=torch.long, device=W_enc.device)
    return torch.relu((tokens - b_dec) @ W_enc[idx].T + b_enc[idx])


# --- store access --------------------------------------------------------------------------------
def open_view(path: str | Path) -> Any:
    """Open a complete feature store for reading (pipeline/store.py; StoreError otherwise)."""
    from . import store

    return store.open(path)


def store_feature_dim(store: Any) -> int:
    """Feature dimension C of a store view."""
    return int(store.feature_dim)


def check_concept(concept: str) -> str:
    """Validate a concept name (ConfigError, exit 2, otherwise)."""
    if concept not in CONCEPTS:
        raise ConfigError(f"unknown concept {concept!r}: use one of {', '.join(CONCEPTS)}")
    return concept


def check_dims(store: Any, sae: Any) -> None:
    """The store's feature dimension must equal the SAE's input dimension (ConfigError otherwise)."""
    d_in, _ = sae_dims(sae)
    dim = store_feature_dim(store)
    if dim != d_in:
        raise ConfigError(
            f"the store holds {dim}-dimensional features but the SAE expects {d_in}: train the SAE on "
            "this store, or extract the store with the backbone the SAE was trained on"
        )


# --- class means -------------------------------------------------------------------------------
def pooled_latents(
    items: Iterable[tuple[int, np.ndarray]], sae: Any, *, device: str = "cpu", progress: Any = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (key, mean over positions of z) for each (key, feature map C x h x w)."""
    from ..progress import check_cancelled

    for key, fmap in items:
        check_cancelled(progress)
        z, _ = pool_map(sae, fmap, device=device)
        yield key, z
        if progress is not None:
            progress.update(1)


def pool_map(sae: Any, fmap: Any, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(mean over positions of the latents z (m,), mean over positions of the features (C,)) of one
    feature map (C, h, w): the pooled quantities every analysis starts from."""
    import torch

    tokens = torch.as_tensor(np.asarray(fmap), device=device).float()
    tokens = tokens.reshape(tokens.shape[0], -1).T
    with torch.inference_mode():
        z = sae.encode(tokens).mean(0)
    return z.float().cpu().numpy(), tokens.mean(0).float().cpu().numpy()


def class_means(
    items: Iterable[tuple[int, np.ndarray]],
    labels: np.ndarray,
    sae: Any,
    *,
    device: str = "cpu",
    progress: Any = None,
) -> ClassMeans:
    """Class-wise means of pooled latents; ``items`` yields (row, feature map), labels[row] in {0, 1}.

    ConfigError when a class has no images (:meth:`ClassMeans.require_complete`).
    """
    _, m = sae_dims(sae)
    sums = np.zeros((2, m), dtype=np.float64)
    count = np.zeros(2, dtype=np.int64)
    for row, pooled in pooled_latents(items, sae, device=device, progress=progress):
        y = int(labels[row])
        if y not in (0, 1):  # -1: label unknown
            continue
        sums[y] += pooled
        count[y] += 1
    return ClassMeans.from_sums(sums, count).require_complete("this concept")


def top_neurons(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest scores, best first (stable for ties)."""
    from ..analysis.ranking import rank

    return [int(i) for i in rank(scores, k)]


# --- top-activating images -------------------------------------------------------------------
@dataclass(order=True)
class TopActivation:
    """Where a neuron fires most in one image: the cell (i, j) of its latent map and the value."""

    activation: float
    image_id: str = field(compare=False)
    sop_instance_uid: str = field(compare=False)
    cell: tuple[int, int] = field(compare=False)
    row: int = field(compare=False)
    split: str = field(compare=False, default="")

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "image_id": self.image_id,
            "sop_instance_uid": self.sop_instance_uid,
            "cell": list(self.cell),
            "activation": self.activation,
            "row": self.row,
            "split": self.split,
        }


def top_activations(
    items: Iterable[tuple[int, np.ndarray]],
    index: Any,
    sae: Any,
    neurons: list[int],
    *,
    n_images: int = 16,
    device: str = "cpu",
    progress: Any = None,
) -> dict[int, list[TopActivation]]:
    """For each neuron the ``n_images`` images with its highest activation, best first."""
    import torch

    from ..progress import check_cancelled

    heaps: dict[int, list[TopActivation]] = {n: [] for n in neurons}
    if not neurons:
        return {}
    for row, fmap in items:
        check_cancelled(progress)
        c, h, w = fmap.shape
        tokens = torch.as_tensor(np.asarray(fmap), device=device).float().reshape(c, -1).T
        with torch.inference_mode():
            z = encode_latents(sae, tokens, neurons).float().cpu().numpy()  # (h*w, k)
        best = z.argmax(0)
        for col, n in enumerate(neurons):
            value = float(z[best[col], col])
            if value <= 0:
                continue
            entry = TopActivation(
                value,
                str(index.image_id[row]),
                str(index.sop_instance_uid[row]),
                (int(best[col] // w), int(best[col] % w)),
                int(row),
                str(index.split[row]),
            )
            heap = heaps[n]
            if len(heap) < n_images:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
        if progress is not None:
            progress.update(1)
    return {n: sorted(h, reverse=True) for n, h in heaps.items()}


# --- the probe file ----------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """Everything ``probe`` writes: rankings, class means and the neuron gallery, keyed by SAE hash."""

    sae_sha256: str
    concept: str
    class_means: np.ndarray  # (2, m)
    class_counts: np.ndarray  # (2,)
    scores: dict[str, np.ndarray]  # method -> (2, m) (a RankingTable: aliases accepted)
    rankings: dict[str, dict[int, list[int]]]  # method -> class -> top neurons, best first
    top_images: dict[int, list[TopActivation]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = RankingTable(self.scores)
        self.rankings = RankingTable(self.rankings)

    def top(self, cls: int = 1, method: str = "class-mean", k: int = 10) -> list[int]:
        """The k top neurons of a class under a ranking method."""
        return top_neurons(self.scores[method][cls], k)


def save_probe(result: ProbeResult, path: str | Path) -> Path:
    """Write a probe result as one .npz (arrays + a JSON header), atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": PROBE_FORMAT,
        "sae_sha256": result.sae_sha256,
        "concept": result.concept,
        "rankings": {m: {str(c): v for c, v in r.items()} for m, r in result.rankings.items()},
        "top_images": {str(n): [t.to_dict() for t in v] for n, v in result.top_images.items()},
        "meta": result.meta,
    }
    arrays = {
        "header": np.array(json.dumps(header)),
        "class_means": result.class_means.astype(np.float32),
        "class_counts": result.class_counts.astype(np.int64),
    }
    for method, s in result.scores.items():
        arrays[f"scores_{method}"] = np.asarray(s, dtype=np.float32)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def _read_header(path: Path) -> tuple[dict, Any]:
    try:
        data = np.load(path, allow_pickle=False)
        header = json.loads(str(data["header"]))
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(
            f"{path.name} is not a probe file ({exc}): run 'napari-mammo-sae probe'"
        ) from exc
    if header.get("format") != PROBE_FORMAT:
        raise StoreError(
            f"{path.name} is not a probe file written by this version of napari-mammo-sae"
        )
    return header, data


def load_probe(path: str | Path) -> ProbeResult:
    """Read a probe file written by :func:`save_probe` (StoreError if it is not one)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no probe file at {path}: run 'napari-mammo-sae probe' first")
    header, data = _read_header(path)
    scores = {
        k[len("scores_") :]: np.asarray(data[k]) for k in data.files if k.startswith("scores_")
    }
    rankings = {m: {int(c): list(v) for c, v in r.items()} for m, r in header["rankings"].items()}
    top_images = {
        int(n): [
            TopActivation(
                float(t["activation"]),
                t["image_id"],
                t["sop_instance_uid"],
                tuple(t["cell"]),
                int(t["row"]),
                t.get("split", ""),
            )
            for t in v
        ]
        for n, v in header["top_images"].items()
    }
    return ProbeResult(
        sae_sha256=header["sae_sha256"],
        concept=header["concept"],
        class_means=np.asarray(data["class_means"]),
        class_counts=np.asarray(data["class_counts"]),
        scores=scores,
        rankings=rankings,
        top_images=top_images,
        meta=header.get("meta", {}),
    )


def find_probe(folder: str | Path, sae_hash: str, concept: str | None = None) -> Path | None:
    """The newest probe file in ``folder`` made for the SAE with this sha256 (and concept)."""
    hits = []
    for path in Path(folder).glob("*.npz"):
        try:
            header, _ = _read_header(path)
        except StoreError:
            continue
        if header["sae_sha256"] == sae_hash and (concept is None or header["concept"] == concept):
            hits.append(path)
    return max(hits, key=lambda p: p.stat().st_mtime) if hits else None


def run_probe(
    store_path: str | Path,
    sae_folder: str | Path,
    concept: str,
    *,
    head_folder: str | Path | None = None,
    split: str = "training",
    top_k: int = 10,
    n_images: int = 16,
    gallery_split: str | None = None,
    device: str = "cpu",
    progress: Any = None,
) -> ProbeResult:
    """Compute class means, rankings and the top neurons' galleries for one concept."""
    check_concept(concept)
    view = open_view(store_path)
    from ..models.folders import load_sae, sae_sha256
    from .dataset import resolve_device

    device = resolve_device(device)  # "auto" -> cuda when available, else cpu
    sae = load_sae(sae_folder).to(device)
    check_dims(view.store, sae)
    head = None
    if head_folder is not None:
        from ..models.folders import backbone_signature, load_model_folder

        model, config = load_model_folder(head_folder)
        # the signature of the weights as loaded (a float16 copy differs from its float32 source)
        sig = backbone_signature(model)
        if sig and view.backbone_signature and sig != view.backbone_signature:
            raise StoreError(
                f"the head {Path(head_folder).name} was trained on another backbone than the one "
                f"that extracted {Path(store_path).name}: extract a store with --weights "
                f"{Path(head_folder).name}, or pass the matching head"
            )
        head = head_parts(model)
        if head[0].size != sae_dims(sae)[0]:
            raise ConfigError(
                f"the head takes {head[0].size} features but the SAE reconstructs {sae_dims(sae)[0]}"
            )
    labels = view.labels(concept)
    rows = view.rows(split)
    if progress is not None:
        progress.set_description(f"class means ({split})")
        progress.set_total(len(rows))
    means = class_means(view.iter_maps(rows), labels, sae, device=device, progress=progress)
    scores = rank_scores(means, sae, head)
    rankings = {m: {c: top_neurons(s[c], top_k) for c in (0, 1)} for m, s in scores.items()}
    gallery = sorted({n for r in rankings.values() for v in r.values() for n in v})
    grows = view.rows(gallery_split) if gallery_split else np.arange(len(view.index.image_id))
    if progress is not None:
        progress.set_description("top-activating images")
        progress.set_total(len(grows))
    tops = top_activations(
        view.iter_maps(grows),
        view.index,
        sae,
        gallery,
        n_images=n_images,
        device=device,
        progress=progress,
    )
    return ProbeResult(
        sae_sha256=sae_sha256(sae_folder),
        concept=concept,
        class_means=means.mean,
        class_counts=means.count,
        scores=scores,
        rankings=rankings,
        top_images=tops,
        meta={
            "store": Path(store_path).name,
            "split": split,
            "grid": list(view.grid),
            "backbone": view.backbone,
            "head": Path(head_folder).name if head_folder else None,
            "top_k": top_k,
        },
    )


# --- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``napari-mammo-sae probe``."""
    parser.add_argument("--store", required=True, help="feature store written by 'extract'")
    parser.add_argument("--sae", required=True, help="SAE weights folder written by 'train'")
    parser.add_argument("--head", help="concept head weights folder (enables logit attribution)")
    parser.add_argument("--concept", required=True, help="mass | calcification")
    parser.add_argument("--out", required=True, help="output file (.npz)")
    parser.add_argument("--split", default="training", help="split the class means are taken over")
    parser.add_argument("--top-k", type=int, default=10, help="top neurons per class and method")
    parser.add_argument("--images", type=int, default=16, help="top-activating images per neuron")
    parser.add_argument("--gallery-split", help="split for the gallery (default: all images)")
    parser.add_argument(
        "--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ..."
    )


def run(args: argparse.Namespace) -> int:
    """Run ``probe`` from parsed arguments; returns the exit status."""
    from ..progress import TqdmProgress

    progress = TqdmProgress(desc="probe")
    try:
        result = run_probe(
            args.store,
            args.sae,
            args.concept,
            head_folder=args.head,
            split=args.split,
            top_k=args.top_k,
            n_images=args.images,
            gallery_split=args.gallery_split,
            device=args.device,
            progress=progress,
        )
    finally:
        progress.close()
    path = save_probe(result, args.out)
    top = result.rankings["class-mean"][1]
    print(f"wrote {path} (SAE {result.sae_sha256[:12]}); top class-1 neurons: {top}")
    return 0
