"""Which model the widgets run: the bundled default or user-chosen files, loaded once and cached.

Qt-free (the widgets call it from worker threads). Sources:

* ``bundled``: ``weights/<variant>-<concept>`` (classifier), ``weights/sae-finetuned-calcification``
  (the one SAE, as in the paper) and ``weights/probes/<concept>.npz`` (dataset rankings, gallery);
  at an intermediate layer (``Layer.stage3``) the finetuned model's own SAE there,
  ``weights/sae-finetuned-<concept>-stage3``, and ``weights/probes/<concept>-stage3.npz``;
* ``custom``: a classifier - our weights folder or a Mammo-CLIP downstream ``.pth`` (pickled: needs
  the trust switch) - and an SAE - our folder or the paper's ``sparse_autoencoder_final.pt``.

The layer an SAE reads is the one its folder's config says it was trained at (``train`` records
it); the Analyzer then runs the backbone to that hook point and re-runs the rest for predictions
and interventions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError

SAE_FOLDER = "sae-finetuned-calcification"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin")


# the choices of the explorer's form (member values are what the form shows)
class Concept(Enum):
    calcification = "suspicious calcification"
    mass = "mass"


class Variant(Enum):
    finetuned = "finetuned"
    pretrained = "pretrained"


class TargetClass(IntEnum):
    present = 1
    absent = 0


class Ranking(Enum):
    logit = "logit contribution"
    class_mean = "class mean"
    class_centred = "class-centred"


class Layer(Enum):
    head = "last layer (closed-form interventions)"
    stage3 = "stage 3, stride 16 (interventions re-run the rest)"


class Source(Enum):
    bundled = "bundled demo weights"
    files = "classifier + SAE files"


def weights_path(path: Any) -> Path | None:
    """A classifier/SAE location from a file picker: a checkpoint file, or the weights folder of a
    file chosen inside one (``config.json``, ``model.safetensors``); None when empty."""
    if path is None or str(path).strip() in ("", "."):
        return None
    p = Path(path)
    return p.parent if p.is_file() and p.suffix.lower() not in CHECKPOINT_SUFFIXES else p


def rank_neurons(
    analysis: Any, ranking: str, target: int, probe: Any, k: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(top-k neurons, their scores, the ranking actually used) for one analysed image."""
    if ranking in ("class_mean", "class_centred") and probe is not None and ranking in probe.scores:
        scores = np.asarray(probe.scores[ranking][target], dtype=np.float64)
        used = ranking
    else:
        contrib = np.asarray(analysis.logit_contributions, dtype=np.float64)
        scores = contrib if target == 1 else -contrib
        used = "logit"
    top = np.argsort(-scores, kind="stable")[:k]
    return top, scores[top], used


@dataclass(frozen=True)
class ModelChoice:
    """What to load: classifier and SAE locations (+ optional probe file)."""

    classifier: Path
    sae: Path
    probe: Path | None = None
    trust_pickle: bool = False
    device: str = "auto"


@dataclass
class LoadedModels:
    """Loaded classifier + SAE, their Analyzer, the SAE's hash and the matching probe result."""

    choice: ModelChoice
    analyzer: Any
    sae_hash: str
    probe: Any  # ProbeResult | None
    config: dict


def bundled_choice(
    concept: str, variant: str, device: str = "auto", layer: str = "head"
) -> ModelChoice:
    """The bundled demo weights for a concept, variant and layer (ConfigError when not built)."""
    from ..models.weights import bundled_weights_dir

    root = bundled_weights_dir()
    clf = root / f"{variant}-{concept}" if root else None
    if root is None or not (root / "MANIFEST.json").exists() or not clf.is_dir():
        raise ConfigError(
            "the bundled demo weights are not there (run `make weights`), or choose a classifier "
            "and an SAE by path"
        )
    if layer == "head":
        sae, probe = root / SAE_FOLDER, root / "probes" / f"{concept}.npz"
    else:
        if variant != "finetuned":
            raise ConfigError(
                f"the bundled {layer} SAEs read the finetuned models' {layer}: choose the "
                "finetuned variant (or the last layer)"
            )
        sae = root / f"sae-finetuned-{concept}-{layer}"
        probe = root / "probes" / f"{concept}-{layer}.npz"
        if not (sae / "model.safetensors").exists():
            raise ConfigError(f"no bundled SAE at {layer} for {concept}: run `make weights`")
    return ModelChoice(clf, sae, probe if probe.exists() else None, False, device)


def _sha256(path: Path) -> str:
    from ..models.weights import sha256_file

    target = path / "model.safetensors" if path.is_dir() else path
    return sha256_file(target)


def _load_classifier(path: Path, trust_pickle: bool) -> tuple[Any, dict]:
    if not path.exists():
        raise CheckpointError(f"no classifier at {path}: choose a weights folder or a .pth file")
    if path.is_dir():
        from ..models.weights import load_weights

        model, config = load_weights(path)
        return model, dict(config)
    from ..models.checkpoints import load_mammoclip_classifier

    return load_mammoclip_classifier(path, trust_pickle=trust_pickle), {"source": path.name}


def _load_sae(path: Path) -> tuple[Any, str]:
    """(SAE, the hook point it was trained at: ``head`` for the paper's file)."""
    if not path.exists():
        raise CheckpointError(f"no SAE at {path}: choose a folder written by 'train' or a .pt file")
    if path.is_dir():
        from ..models.folders import sae_hook
        from ..models.weights import load_weights

        sae, config = load_weights(path)
        return sae, sae_hook(config)
    from ..models.sae import load_mammosae

    return load_mammosae(path), "head"


_CACHE: dict[ModelChoice, LoadedModels] = {}
_LOCK = threading.Lock()


def load_models(choice: ModelChoice) -> LoadedModels:
    """Load (or reuse) the models of a choice; the Analyzer's image cache is kept across runs."""
    with _LOCK:
        if choice in _CACHE:
            return _CACHE[choice]
        from ..models.inference import Analyzer

        classifier, config = _load_classifier(choice.classifier, choice.trust_pickle)
        sae, hook = _load_sae(choice.sae)
        analyzer = Analyzer(classifier, sae, config=config, device=choice.device, hook=hook)
        sae_hash = _sha256(choice.sae)
        probe = None
        if choice.probe is not None and choice.probe.exists():
            from ..pipeline.probe import load_probe

            candidate = load_probe(choice.probe)
            if candidate.sae_sha256 == sae_hash:
                probe = candidate
        loaded = LoadedModels(choice, analyzer, sae_hash, probe, config)
        _CACHE[choice] = loaded
        return loaded


@dataclass
class ImageResult:
    """One analysed image: the analysis, the ranked neurons and their maps and box agreement."""

    layer_name: str
    analysis: Any  # models.inference.Analysis
    placement: Any  # layout.Placement
    neurons: np.ndarray  # top-k neuron ids, best first
    scores: np.ndarray  # their ranking scores
    maps: np.ndarray  # (k, h, w) latent maps
    box_iou: dict[int, float] = field(default_factory=dict)
    annotations: list = field(default_factory=list)  # boxes in original pixels


class ViewerProgress:
    """The core's Progress in napari's activity dock, made on first use (a cache hit shows nothing).

    Safe from a worker thread: napari's ``progress`` objects emit events that the viewer handles.
    """

    cancelled = False

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._bar: Any = None

    def _get(self) -> Any:
        if self._bar is None:
            from napari.utils import progress

            self._bar = progress(total=0, desc=self._desc)
        return self._bar

    def set_total(self, total: int | None) -> None:
        self._get().total = total or 0

    def update(self, n: int = 1) -> None:
        self._get().update(n)

    def set_description(self, text: str) -> None:
        self._get().set_description(text)

    def set_postfix(self, **values: object) -> None:
        self._get().set_description(
            f"{self._desc}: " + ", ".join(f"{k} {v}" for k, v in values.items())
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def analyse_layers(
    targets: list[tuple[str, Any, Any]],
    choice: ModelChoice,
    *,
    ranking: str,
    target_class: int,
    k: int,
    shapes: list[np.ndarray],
    open_labels: bool = False,
    label_db: Any = None,
) -> tuple[Any, dict[str, ImageResult], str]:
    """Worker body (no Qt): load models, analyse each (name, record, placement), rank, score boxes.

    ``open_labels``: open the verdict database ``label_db`` (None: the default one) once at the
    end, so the dock's first read of the verdicts (imports and a schema check, 270 ms) does not
    land on the GUI thread."""
    from ..analysis.localisation import box_agreement
    from ..errors import MammoSAEError
    from .layers import shapes_to_boxes

    try:
        models = load_models(choice)
    except MammoSAEError as exc:  # typed errors are shown by the widget, not raised into napari
        return None, {}, str(exc)
    # The first use of a model exports its backbone for ONNX Runtime (minutes for a B5): show it in
    # napari's activity bar, not only as a status text; later runs load the cached graph at once.
    yield "preparing the backbone runtime"
    bar = ViewerProgress("backbone runtime")
    try:
        models.analyzer.prepare_runtime(bar)
    except MammoSAEError as exc:
        return None, {}, str(exc)
    finally:
        bar.close()
    results: dict[str, ImageResult] = {}
    used = ranking
    i = 0
    while i < len(targets):  # the list may grow while this runs (views of an exam being opened)
        name, record, placement = targets[i]
        i += 1
        yield f"analysing {name}" + (f" ({i} of {len(targets)})" if len(targets) > 1 else "")
        try:
            analysis = models.analyzer.analyse(record)
        except MammoSAEError as exc:
            return None, {}, f"{name}: {exc}"
        top, scores, used = rank_neurons(analysis, ranking, target_class, models.probe, k)
        maps = analysis.latent_maps(top)
        boxes = shapes_to_boxes(placement, shapes) if placement is not None else []
        ious = {}
        for n, m in zip(top, maps, strict=True):
            ious[int(n)] = (
                box_agreement(m, boxes, analysis.geometry).iou
                if boxes and m.max() > 0
                else float("nan")
            )
        results[name] = ImageResult(name, analysis, placement, top, scores, maps, ious, boxes)
    if open_labels:
        from ..labels import LabelStore

        try:
            LabelStore(label_db).close()
        except Exception:  # noqa: BLE001 - the table says '?' when the database cannot be read
            pass
    return models, results, used
