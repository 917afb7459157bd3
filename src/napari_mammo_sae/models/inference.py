"""One inference object: record -> preprocessing -> backbone -> SAE -> probability, latents, heatmaps.

:class:`Analyzer` runs a concept classifier (backbone + linear head on average-pooled features) and an
SAE on one mammogram and returns an :class:`Analysis`: the concept probability, the pooled latents, the
per-position latents (kept compactly), heatmaps of requested neurons on the feature grid, each neuron's
logit contribution and the per-stage timings. Results are cached per image (SOPInstanceUID, frame and a
pixel checksum) *and* signature (content hash of the classifier's and the SAE's weights, the
preprocessing signature and the dtype), so a repeated analysis, a new neuron set or an intervention
never reruns the backbone, and a changed model or preprocessing never reuses a stale result.

An SAE trained at an intermediate hook point (``models.backbone``: ``stage3``...) reads the backbone
there: the runtime runs the backbone up to the hook, the layers after it run in PyTorch for the
model's own prediction, and an intervention re-runs them from the edited SAE reconstruction
(:class:`RerunEngine`: there is no closed form). Per-neuron logit contributions and the CAM are then
gradient x activation of the reconstruction's logit with respect to the latents - exact at the
last layer, where the logit is linear in the latents, a first-order estimate elsewhere (their sum
plus the remainder ``bias`` is the reconstruction logit).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.interventions import (
    MODES,
    InterventionEngine,
    _neuron_index,
    head_parts,
    logit_weights,
    module_state_key,
    neuron_mask,
    sigmoid,
)
from ..errors import ConfigError
from ..geometry import Geometry
from ..progress import Progress, check_cancelled
from .backbone import HEAD, at_hook, resolve_hook, rest_of_backbone
from .runtime import OnnxRuntime, create_runtime, default_runtime, resolve_runtime

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: per-position latents are stored as CSR when at most this fraction is non-zero, else dense float16
SPARSE_MAX_DENSITY = 0.25
STAGES = ("decode", "preprocess", "backbone", "sae", "heatmaps")


# --- device and dtype ----------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA if available, then MPS, then CPU; otherwise the named device."""
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or mps") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available: use auto")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("device 'mps' was asked for but MPS is not available: use auto")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """float32 everywhere; bfloat16 / float16 (autocast) only on a GPU."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    if dtype != "float32" and device.type == "cpu":
        raise ConfigError(f"{dtype} is for GPUs (it is very slow on CPUs): use dtype='float32'")
    return DTYPES[dtype]


# --- signatures ------------------------------------------------------------------------------------
def _tensors(module: Any) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def module_digest(module: Any) -> str:
    """sha256 of a module's parameter and buffer names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in _tensors(module):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Digests:
    """Content hashes of modules, recomputed only when their tensors change."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[tuple, str]] = {}

    def __call__(self, module: Any) -> str:
        key = module_state_key(module)
        hit = self._memo.get(id(module))
        if hit is None or hit[0] != key:
            hit = (key, module_digest(module))
            self._memo[id(module)] = hit
        return hit[1]


def record_key(record: Any) -> tuple:
    """Identity of an image for the cache: SOPInstanceUID, frame, shape and a pixel checksum."""
    pixels = np.asarray(record.pixels)
    uid = str(getattr(record, "sop_instance_uid", "") or "")
    # a strided checksum guards against UID collisions (bad anonymisers); a full one without a UID
    sample = (
        pixels
        if not uid
        else pixels[:: max(1, pixels.shape[0] // 64), :: max(1, pixels.shape[1] // 64)]
    )
    digest = hashlib.blake2b(np.ascontiguousarray(sample).tobytes(), digest_size=16).hexdigest()
    return (uid, getattr(record, "frame", None), tuple(pixels.shape), digest)


# --- compact per-position latents ------------------------------------------------------------------
class PositionLatents:
    """SAE latents of every feature-grid position, (P, m): CSR when sparse, dense float16 otherwise."""

    def __init__(self, shape: tuple[int, int], *, csr: Any = None, dense: np.ndarray | None = None):
        self.shape = (int(shape[0]), int(shape[1]))
        self._csr = csr
        self._dense = dense
        if (csr is None) == (dense is None):
            raise ValueError("give exactly one of csr and dense")

    @classmethod
    def from_tensor(
        cls, z: torch.Tensor, max_density: float = SPARSE_MAX_DENSITY
    ) -> PositionLatents:
        """Store (P, m) latents: CSR float32 if the non-zero fraction is <= max_density."""
        shape = (int(z.shape[0]), int(z.shape[1]))
        # the non-zeros are found where z lives (torch's nonzero is also ~3x numpy's flatnonzero
        # on a CPU), and only they move
        flat_z = torch.flatten(z.detach())
        flat_t = flat_z.nonzero().reshape(-1)
        if flat_t.numel() > max_density * flat_z.numel():
            return cls(shape, dense=z.detach().half().cpu().numpy())
        values = flat_z[flat_t].float().cpu().numpy()
        return cls._csr_from_flat(shape, flat_t.cpu().numpy(), values)

    @classmethod
    def _csr_from_flat(cls, shape, flat: np.ndarray, values: np.ndarray) -> PositionLatents:
        import scipy.sparse

        m = shape[1]
        indptr = np.searchsorted(flat, np.arange(shape[0] + 1, dtype=np.int64) * m)
        cols = (flat % m).astype(np.int32)
        csr = scipy.sparse.csr_array((values, cols, indptr.astype(np.int64)), shape=shape)
        return cls(shape, csr=csr)

    @property
    def is_sparse(self) -> bool:
        """True when stored as CSR."""
        return self._csr is not None

    @property
    def nnz(self) -> int:
        """Number of non-zero latents over all positions."""
        return int(self._csr.nnz) if self._csr is not None else int(np.count_nonzero(self._dense))

    @property
    def density(self) -> float:
        """Fraction of non-zero latents."""
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Memory held by the stored arrays."""
        if self._csr is not None:
            c = self._csr
            return int(c.data.nbytes + c.indices.nbytes + c.indptr.nbytes)
        return int(self._dense.nbytes)

    def columns(self, neurons: Iterable[int]) -> np.ndarray:
        """Latents of the given neurons at every position, (P, k) float32."""
        idx = np.asarray(list(neurons), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[1]):
            raise ConfigError(f"neuron indices must lie in [0, {self.shape[1]}) for this SAE")
        if self._csr is not None:
            return np.asarray(self._csr[:, idx].toarray(), dtype=np.float32)
        return self._dense[:, idx].astype(np.float32)

    def toarray(self) -> np.ndarray:
        """All latents, (P, m) float32."""
        if self._csr is not None:
            return self._csr.toarray().astype(np.float32, copy=False)
        return self._dense.astype(np.float32)

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """z(p) . v for every position, (P,) float64."""
        v = np.asarray(v, dtype=np.float64)
        if self._csr is not None:
            return np.asarray(self._csr @ v).reshape(-1)
        return np.asarray(self._dense.astype(np.float32) @ v.astype(np.float32), dtype=np.float64)


# --- the result -------------------------------------------------------------------------------------
@dataclass
class Analysis:
    """What :meth:`Analyzer.analyse` returns for one image (maps on the feature grid, see geometry)."""

    probability: float  # sigmoid of the classifier's logit on the original features
    logit: float
    geometry: Geometry
    grid: tuple[int, int]  # feature grid (h, w)
    pooled_latents: np.ndarray  # (m,) float32, mean over positions of z
    latents: PositionLatents  # (h*w, m) per-position latents, row-major over the grid
    pooled_features: np.ndarray  # (C,) float32, the head's input
    logit_contributions: np.ndarray  # (m,) float64, (W_dec^T w)_j * pooled_latents_j
    reconstruction_logit: float  # head on the SAE reconstruction (closed form)
    cam: (
        np.ndarray
    )  # (h, w) float32, reconstruction class-activation map (mean = reconstruction_logit)
    heatmaps: dict[int, np.ndarray]  # neuron -> (h, w) latent map, for the requested neurons
    timings: dict[str, float]  # seconds per stage of this call: decode, preprocess, backbone, sae
    # (sae_encode: its encoder part), heatmaps, total; 0 for stages served from the cache
    signature: str  # weights + preprocessing + dtype: what the cache is keyed by
    sop_instance_uid: str = ""
    preprocess: str = "mammoclip"
    cached: bool = False  # True when the backbone and SAE were not rerun for this call
    runtime: str = ""  # the backbone runtime that made the features: "onnx" or "torch"
    features: np.ndarray | None = field(default=None, repr=False)  # (C, h, w) float32 if kept
    hook: str = HEAD  # the backbone layer the SAE reads (models.backbone hook point)
    _weights: tuple[np.ndarray, float] | None = field(default=None, repr=False)
    # at a hook point: per-position gradient x activation (P, m) and the logit of edited latents
    _attributions: PositionLatents | None = field(default=None, repr=False)
    _rerun: Any = field(default=None, repr=False)
    _engine: Any = field(default=None, repr=False)

    @property
    def reconstruction_probability(self) -> float:
        """Probability of the head on the SAE reconstruction."""
        return float(sigmoid(self.reconstruction_logit))

    @property
    def n_neurons(self) -> int:
        """Number of SAE latents m."""
        return int(self.pooled_latents.shape[0])

    def latent_maps(self, neurons: Iterable[int]) -> np.ndarray:
        """Latent maps of the given neurons on the feature grid, (k, h, w) float32."""
        idx = [int(n) for n in neurons]
        cols = self.latents.columns(idx)  # (P, k)
        return np.ascontiguousarray(cols.T.reshape(len(idx), *self.grid))

    def top_neurons(self, k: int = 10, by: str = "contribution") -> np.ndarray:
        """The k neurons with the largest logit contribution (or pooled activation: by='activation')."""
        if by not in ("contribution", "activation"):
            raise ConfigError("top_neurons ranks by 'contribution' or 'activation'")
        s = self.logit_contributions if by == "contribution" else self.pooled_latents
        return np.argsort(-np.asarray(s), kind="stable")[: max(0, int(k))]

    @property
    def closed_form(self) -> bool:
        """True at the last layer: interventions are one small sum; False at a hook point, where
        each one re-runs the rest of the backbone."""
        return self._rerun is None

    def intervention(self) -> InterventionEngine:
        """An engine for interventions on this image: the closed form at the last layer, a
        :class:`RerunEngine` (the rest of the backbone re-run) at a hook point. Made once."""
        if self._engine is not None:
            return self._engine
        if self._rerun is not None:
            self._engine = RerunEngine(self)
        elif self._weights is None:
            raise ConfigError("this analysis holds no head weights: analyse it with an Analyzer")
        else:
            self._engine = InterventionEngine(self.pooled_latents, weights=self._weights)
        return self._engine

    def region_intervention(self, cells: np.ndarray) -> Any:
        """Switch every latent off on the feature cells ``cells`` ((h, w) bool, e.g. the cells a
        box the reader drew touches) and keep the rest: the InterventionResult (mode "region", no
        neuron set). At the last layer the closed form - those positions' CAM terms replaced by
        the CAM's constant part; at a hook point the edited latents re-run through the rest of
        the backbone.

        A shortcut that no single neuron carries but that sits in one place of the image (the
        phantom's clip, docs/EVALUATION.md) is removed this way."""
        from ..analysis.interventions import InterventionResult

        mask = np.asarray(cells, dtype=bool)
        if mask.shape != tuple(self.grid):
            raise ConfigError(f"the region must be a {self.grid[0]} x {self.grid[1]} cell mask")
        flat = mask.reshape(-1)
        if self._rerun is None:
            if self._weights is None:
                raise ConfigError(
                    "this analysis holds no head weights: analyse it with an Analyzer"
                )
            cam = np.asarray(self.cam, dtype=np.float64).reshape(-1)
            logit = float(np.where(flat, self.cam_bias, cam).mean())
        else:
            z = self.latents.toarray()
            z[flat] = 0.0
            logit = float(self._rerun(z))
        rec = float(self.reconstruction_logit)
        return InterventionResult("region", np.zeros(0, dtype=np.int64), logit,
                                  float(sigmoid(logit)), rec, float(sigmoid(rec)))  # fmt: skip

    def _position_terms(self, idx: np.ndarray) -> np.ndarray:
        """(P,) sum over the neurons ``idx`` of each position's share of the CAM."""
        if self._attributions is not None:
            positions = self.grid[0] * self.grid[1]  # the CAM's mean is the logit: P x attribution
            return self._attributions.columns(idx).astype(np.float64).sum(axis=1) * positions
        v, _ = self._weights
        return self.latents.columns(idx).astype(np.float64) @ v[idx]

    def reconstruction_cam(self, neurons: Any = None, mode: str = "remove") -> np.ndarray:
        """Reconstruction CAM (h, w) with ``neurons`` kept or removed (None: nothing removed),
        from the full CAM and only the set's (or, for a large set, its complement's) columns.

        At a hook point the CAM is gradient x activation, so this is its first-order estimate; the
        probability of :meth:`intervention` is exact (re-run)."""
        if self._weights is None and self._attributions is None:
            raise ConfigError("this analysis holds no head weights: analyse it with an Analyzer")
        if mode not in ("keep", "remove"):
            raise ConfigError(f"unknown intervention mode {mode!r}: use keep or remove")
        m = self.n_neurons
        full = np.asarray(self.cam, dtype=np.float64).reshape(-1)
        bias = self.cam_bias
        idx = _neuron_index(neurons, m)  # sorted, unique, checked
        if idx.size > m // 2:  # a large set: cheaper from its complement
            idx = np.setdiff1d(np.arange(m), idx)
            mode = "keep" if mode == "remove" else "remove"
        part = self._position_terms(idx) if idx.size else np.zeros_like(full)
        flat = part + bias if mode == "keep" else full - part
        return np.asarray(flat, dtype=np.float32).reshape(self.grid)

    @property
    def cam_bias(self) -> float:
        """The CAM's constant part: what a position contributes with every neuron off."""
        if self._weights is not None:
            return float(self._weights[1])
        return float(self.reconstruction_logit - np.sum(self.logit_contributions))


class RerunEngine(InterventionEngine):
    """Interventions at an intermediate hook point: the edited latents are decoded and the rest of
    the backbone and the concept head re-run for each neuron set - there is no closed form there.

    The same interface as :class:`InterventionEngine` (``apply``, ``topk_*``, ``custom``); its
    ``contributions`` are the analysis' gradient x activation estimates (used only to rank), its
    logits are exact. The last ``memo`` sets are remembered, so a slider that comes back to a value
    does not re-run anything.
    """

    def __init__(self, analysis: Analysis, memo: int = 64) -> None:
        if analysis._rerun is None:
            raise ConfigError("this analysis is at the last layer: use its closed-form engine")
        self.pooled_latents = np.asarray(analysis.pooled_latents, dtype=np.float64)
        self.contributions = np.asarray(analysis.logit_contributions, dtype=np.float64)
        self.total = float(self.contributions.sum())
        self.reconstruction_logit = float(analysis.reconstruction_logit)
        self.bias = self.reconstruction_logit - self.total
        self._z = analysis.latents.toarray()  # (P, m) float32: the latents every step edits
        self._rerun = analysis._rerun
        self._memo: OrderedDict[tuple, float] = OrderedDict()
        self._memo_size = max(1, int(memo))
        self._ranked = None
        self.reruns = 0  # how many times the rest of the backbone ran (tests, benchmarks)

    @property
    def n_neurons(self) -> int:
        """Number of SAE latents m."""
        return int(self._z.shape[1])

    def logit(self, neurons: Any, mode: str) -> float:
        """Intervened logit: the latents with ``neurons`` kept or removed, decoded, re-run."""
        if mode not in MODES:
            raise ConfigError(f"unknown intervention mode {mode!r}: use one of {', '.join(MODES)}")
        idx = _neuron_index(neurons, self.n_neurons)
        if mode == "remove" and idx.size == 0:
            return self.reconstruction_logit
        key = (mode, idx.tobytes())
        hit = self._memo.get(key)
        if hit is not None:
            self._memo.move_to_end(key)
            return hit
        mask = neuron_mask(self.n_neurons, idx, mode).astype(np.float32)
        value = float(self._rerun(self._z * mask[None, :]))
        self.reruns += 1
        self._memo[key] = value
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return value


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.setflags(write=False)  # shares the cache's memory: must not be changed
    return view


# --- the analyzer ---------------------------------------------------------------------------------
@dataclass
class _SaeResult:
    """One SAE's output on one image; ``cams`` holds full-precision CAMs per head (v bytes)."""

    latents: PositionLatents
    pooled: np.ndarray  # (m,) float32
    seconds: float
    cams: dict[bytes, np.ndarray] = field(default_factory=dict)
    encode_seconds: float = 0.0  # the encoder alone (part of ``seconds``)


@dataclass
class _ImageEntry:
    """Cached per-image backbone output and the latents of each SAE seen (keyed by SAE digest)."""

    features: torch.Tensor  # (C, h, w) float32 on the CPU
    pooled_features: np.ndarray  # (C,) float64
    geometry: Geometry
    timings: dict[str, float]  # preprocess, backbone of the run that made it
    runtime: str = ""  # the backbone runtime that made ``features``
    latents: dict[str, _SaeResult] = field(default_factory=dict)


class AnalysisCache:
    """LRU of per-image backbone features (+ SAE latents), shareable between Analyzers.

    Keys hold the image identity and the backbone/preprocessing/dtype signature; SAE latents sit
    under the SAE's content hash inside an entry, so a changed model never reuses a stale result and
    switching head or SAE on the same backbone never reruns the backbone.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = max(0, int(size))
        self._items: OrderedDict[tuple, _ImageEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._items.clear()

    def get(self, key: tuple) -> _ImageEntry | None:
        """The entry for ``key`` (now most recently used), or None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
            return entry

    def put(self, key: tuple, entry: _ImageEntry) -> None:
        """Store an entry, evicting the least recently used beyond ``size``."""
        if self.size == 0:
            return
        with self._lock:
            self._items[key] = entry
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class Analyzer:
    """Runs a concept classifier and an SAE on mammograms, with a per-image, signature-keyed cache.

    ``classifier`` has ``forward_features(x) -> (1, C, h, w)`` (or a ``.backbone`` that has) and a
    linear head (``.head``: Linear(C, 1) on average-pooled features). The models are moved to
    ``device`` and put in eval mode. ``preprocess``/``size`` default to ``config`` (a weights
    folder's config.json dict: ``preprocess``, ``input_size``), else Mammo-CLIP's 1520 x 912.
    Pass ``cache=`` (an :class:`AnalysisCache`, e.g. another Analyzer's ``.cache``) to share
    backbone results between analyzers that differ only in head or SAE. ``runtime`` (``auto``,
    ``torch``, ``onnx``; default ``$NAPARI_MAMMO_SAE_RUNTIME`` or ``auto``) chooses what runs the
    backbone (:mod:`.runtime`): ``auto`` is ONNX Runtime on the CPU and PyTorch on a GPU; the
    ONNX export is made at the first analysis (or :meth:`prepare_runtime`) and cached on disk.
    ``runtime_name`` says which one runs (each :class:`Analysis` records it too).
    """

    def __init__(
        self,
        classifier: Any,
        sae: Any,
        *,
        preprocess: str | None = None,
        size: tuple[int, int] | None = None,
        device: str | torch.device = "auto",
        dtype: str = "float32",
        cache_size: int = 8,
        cache: AnalysisCache | None = None,
        config: dict | None = None,
        runtime: str | None = None,
        hook: str | None = None,
    ) -> None:
        from ..preprocess import MAMMOCLIP_SIZE, PREPROCESSORS, preprocessing_signature

        config = dict(config or getattr(classifier, "config", None) or {})
        self.preprocess = preprocess or config.get("preprocess") or "mammoclip"
        if self.preprocess not in PREPROCESSORS:
            raise ConfigError(
                f"unknown preprocessing {self.preprocess!r}: use one of {', '.join(PREPROCESSORS)}"
            )
        self.size = tuple(int(v) for v in (size or config.get("input_size") or MAMMOCLIP_SIZE))
        self.preprocessing_signature = preprocessing_signature(self.preprocess, self.size)
        self._preprocess_fn = PREPROCESSORS[self.preprocess]
        self.device = resolve_device(device)
        self.dtype_name = dtype
        self.dtype = resolve_dtype(dtype, self.device)
        self.classifier = classifier.to(self.device).eval()
        self.sae = sae.to(self.device).eval()
        #: the backbone layer the SAE reads: "head" (the last layer) or a hook point ("stage3"...)
        self.hook = HEAD if hook in (None, "", HEAD) else resolve_hook(self._backbone(), hook).name
        self._hooked = None if self.hook == HEAD else at_hook(self._backbone(), self.hook)
        self._forward_features = (
            self._features_fn(self.classifier)
            if self._hooked is None
            else self._hooked.forward_features
        )
        self._check_dims()
        self._digests = _Digests()
        self.cache = cache if cache is not None else AnalysisCache(cache_size)
        self._weights_key: tuple | None = None
        self._weights: tuple[np.ndarray, float, np.ndarray, float] | None = None
        self.runtime_requested = default_runtime() if runtime is None else str(runtime).lower()
        #: the runtime that runs (or will run) the backbone: "onnx" or "torch"
        self.runtime_name = resolve_runtime(self.runtime_requested, self.device, dtype)
        self._runtime: Any = None
        self._runtime_digest = ""
        self._runtime_lock = threading.Lock()
        self._workspace: torch.Tensor | None = None
        self._workspace_lock = threading.Lock()

    @classmethod
    def from_weights(
        cls, classifier_folder: str | Path, sae_folder: str | Path, **kw: Any
    ) -> Analyzer:
        """An Analyzer from a classifier weights folder ('train-head') and an SAE folder ('train');
        the hook point is the one the SAE was trained at (its config), unless ``hook=`` is given."""
        from .folders import load_model_folder, load_sae, sae_hook
        from .weights import read_config

        classifier, config = load_model_folder(classifier_folder)
        kw.setdefault("hook", sae_hook(read_config(sae_folder)))
        return cls(classifier, load_sae(sae_folder), config=config, **kw)

    def with_models(self, classifier: Any = None, sae: Any = None) -> Analyzer:
        """A sibling Analyzer with another classifier/head or SAE, sharing this one's cache."""
        sibling = Analyzer(
            classifier if classifier is not None else self.classifier,
            sae if sae is not None else self.sae,
            preprocess=self.preprocess,
            size=self.size,
            device=self.device,
            dtype=self.dtype_name,
            cache=self.cache,
            runtime=self.runtime_requested,
            hook=self.hook,
        )
        if sibling._backbone() is self._backbone() and self._hooked is not None:
            sibling._hooked = self._hooked  # the same module: the runtime below stays valid
            sibling._forward_features = self._hooked.forward_features
        if (
            isinstance(self._runtime, OnnxRuntime)
            and sibling._runtime_module() is self._runtime_module()
        ):
            sibling._runtime, sibling._runtime_digest = self._runtime, self._runtime_digest
        return sibling

    # --- model access ------------------------------------------------------------------------------
    @staticmethod
    def _features_fn(classifier: Any):
        for owner in (classifier, getattr(classifier, "backbone", None)):
            fn = getattr(owner, "forward_features", None)
            if callable(fn):
                return fn
        raise ConfigError(
            "the classifier has no forward_features(x): pass a ConceptClassifier (backbone + head)"
        )

    def _backbone(self) -> Any:
        backbone = getattr(self.classifier, "backbone", None)
        return backbone if isinstance(backbone, torch.nn.Module) else self.classifier

    def _runtime_module(self) -> Any:
        """What the runtime runs: the backbone, or the backbone up to the hook point."""
        return self._hooked if self._hooked is not None else self._backbone()

    def _check_dims(self) -> None:
        w, _ = head_parts(self.classifier)
        d_in = int(self.sae.W_dec.shape[0])
        if self._hooked is not None:
            channels = int(self._hooked.point.channels)
            if channels != d_in:
                raise ConfigError(
                    f"the backbone has {channels} channels at {self.hook} but the SAE was trained "
                    f"on {d_in}: use the SAE trained at this hook point of this backbone"
                )
            return
        if w.shape[0] != d_in:
            raise ConfigError(
                f"the classifier's head reads {w.shape[0]} features but the SAE was trained on "
                f"{d_in}: use the SAE trained on this backbone's features"
            )

    def _feature_signature(self) -> str:
        at = "" if self.hook == HEAD else f"_at-{self.hook}"
        return (
            f"bb-{self._digests(self._backbone())[:16]}{at}_{self.preprocessing_signature}_"
            f"{self.dtype_name}"
        )

    def _head_logits(self, fmaps: torch.Tensor) -> torch.Tensor:
        """The concept head's logits (N,) on hook-point activations (N, C, h, w): the rest of the
        backbone, average pooling and the linear head, differentiable."""
        w, c = head_parts(self.classifier)
        feats = self._hooked.rest(fmaps.to(self.device))
        w_t = torch.as_tensor(w, dtype=feats.dtype, device=feats.device)
        return feats.mean(dim=(2, 3)) @ w_t + float(c)

    def _pooled_head_features(self, fmaps: torch.Tensor) -> np.ndarray:
        """(N, C_head) float64 pooled head features: the model's own input to its head. At a hook
        point the layers after it run here (PyTorch), from the runtime's activations."""
        if self._hooked is None:
            return fmaps.mean(dim=(2, 3)).double().cpu().numpy()
        with torch.inference_mode(), self._autocast():
            feats = self._hooked.rest(fmaps.to(self.device))
        return feats.float().mean(dim=(2, 3)).double().cpu().numpy()

    def _logit_of_latents(self, grid: tuple[int, int], z: np.ndarray) -> float:
        """The head's logit on the SAE decoding of per-position latents ``z`` (P, m) at the hook
        point, the rest of the backbone re-run (what a :class:`RerunEngine` step does)."""
        h, w = grid
        with torch.inference_mode(), self._autocast():
            zt = torch.as_tensor(z, device=self.device, dtype=self.sae.W_dec.dtype)
            x_hat = self.sae.decode(zt).T.reshape(1, -1, h, w)
            return float(self._head_logits(x_hat.float())[0])

    def _hook_key(self) -> bytes:
        w, c = head_parts(self.classifier)
        return b"hook|" + w.tobytes() + np.float64(c).tobytes()

    def _hook_terms(self, entry: _ImageEntry, sae_result: _SaeResult) -> tuple:
        """(contributions (m,), per-position attributions, reconstruction logit) at a hook point:
        gradient x activation of the reconstruction's logit with respect to the latents, cached
        per head with the SAE's result (made from the float32 latents when the SAE ran; from the
        stored ones for another head on cached latents)."""
        hit = sae_result.cams.get(self._hook_key())
        if hit is not None:
            return hit
        _, h, wd = entry.features.shape
        terms = self._attribute(torch.as_tensor(sae_result.latents.toarray()), (h, wd))
        sae_result.cams[self._hook_key()] = terms
        return terms

    def _attribute(self, z: torch.Tensor, grid: tuple[int, int]) -> tuple:
        """(contributions, per-position attributions, logit) for latents z (P, m)."""
        attr, logit = latent_attribution(self.sae, self.classifier, self.hook, z, grid)
        return attr.sum(dim=0).double().numpy(), PositionLatents.from_tensor(attr), logit

    @property
    def signature(self) -> str:
        """Content hashes of backbone, head and SAE + preprocessing signature + dtype."""
        w, c = head_parts(self.classifier)
        head = hashlib.sha256(w.tobytes() + np.float64(c).tobytes()).hexdigest()
        return f"{self._feature_signature()}_head-{head[:16]}_sae-{self._digests(self.sae)[:16]}"

    def head_weights(self) -> tuple[np.ndarray, float, np.ndarray, float]:
        """(w, c, v = W_dec^T w, w . b_dec + c), recomputed only when the weights change."""
        key = (module_state_key(self.classifier), module_state_key(self.sae))
        if self._weights is None or self._weights_key != key:
            w, c = head_parts(self.classifier)
            v, bias = logit_weights(self.sae, (w, c))
            self._weights, self._weights_key = (w, c, v, bias), key
        return self._weights

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare_runtime(self, progress: Progress | None = None) -> Any:
        """Build the backbone runtime now (an ONNX export on first use shows on ``progress``).

        Rebuilt when the backbone's weights change; ``runtime_name`` then says which one runs.
        """
        with self._runtime_lock:
            backbone = self._runtime_module()
            digest = self._digests(backbone)
            if self._runtime is None or self._runtime_digest != digest:
                runtime = create_runtime(
                    backbone,
                    self.runtime_requested,
                    size=self.size,
                    device=self.device,
                    dtype=self.dtype_name,
                    forward=self._forward_features,
                    progress=progress,
                    weights=digest,
                )
                self._runtime, self._runtime_digest = runtime, digest
                self.runtime_name = runtime.name
            return self._runtime

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- cache -------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget every cached result (also for analyzers sharing this cache)."""
        self.cache.clear()

    @property
    def cache_len(self) -> int:
        """Number of cached images."""
        return len(self.cache)

    # --- analysis ----------------------------------------------------------------------------------
    def analyse(
        self, record: Any, neurons: Iterable[int] | None = None, progress: Progress | None = None
    ) -> Analysis:
        """Probability, latents and heatmaps of ``neurons`` for one mammogram record (cached)."""
        t_start = time.perf_counter()
        timings = dict.fromkeys((*STAGES, "sae_encode"), 0.0)
        check_cancelled(progress)
        if progress is not None:
            progress.set_total(4)
        runtime = self.prepare_runtime(progress)
        key = (record_key(record), self._feature_signature(), runtime.name)
        entry = self.cache.get(key)
        ran_backbone = entry is None
        if entry is None:
            entry = self._run_backbone(record, progress, runtime)
            timings.update(entry.timings)
        elif progress is not None:
            progress.update(2)
        sae_digest = self._digests(self.sae)
        sae_result = entry.latents.get(sae_digest)
        ran_sae = sae_result is None
        if sae_result is None:
            sae_result = self._run_sae(entry.features, progress)
            timings["sae"] = sae_result.seconds
            timings["sae_encode"] = sae_result.encode_seconds
        elif progress is not None:
            progress.update(1)
        if ran_backbone:  # only now: a cancelled run leaves nothing behind
            self.cache.put(key, entry)
        if ran_sae:
            entry.latents[sae_digest] = sae_result
        check_cancelled(progress)
        if progress is not None:
            progress.set_description("heatmaps")
        t0 = time.perf_counter()
        result = self._assemble(record, entry, sae_result, neurons)
        timings["heatmaps"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        result.timings = timings
        result.cached = not ran_backbone
        result.runtime = entry.runtime
        if progress is not None:
            progress.update(1)
        return result

    def _run_backbone(self, record: Any, progress: Progress | None, runtime: Any) -> _ImageEntry:
        """Preprocess and run the backbone: the expensive, SAE- and head-independent part."""
        if progress is not None:
            progress.set_description("preprocessing")
        t0 = time.perf_counter()
        pre = self._preprocess_fn(record, self.size)
        x = pre.tensor()
        if self.device.type == "cuda":  # the runtime copies it without blocking
            x = x.pin_memory()
        t_pre = time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
            progress.set_description("backbone")
        check_cancelled(progress)
        t0 = time.perf_counter()
        fmap = runtime(x)[0].to(self.device)  # (C, h, w) float32
        pooled = self._pooled_head_features(fmap[None])[0]
        self._sync()
        t_bb = time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
            progress.set_description("sparse autoencoder")
        check_cancelled(progress)
        # features stay on the device until the SAE has run (no round trip)
        timings = {"preprocess": t_pre, "backbone": t_bb}
        return _ImageEntry(fmap, pooled, pre.geometry, timings, runtime.name)

    def _run_sae(self, fmap: torch.Tensor, progress: Progress | None) -> _SaeResult:
        """SAE latents of every position (compact), their mean, and this head's CAM from float32 z."""
        t0 = time.perf_counter()
        C, h, w = fmap.shape
        tokens = fmap.to(self.device).reshape(C, h * w).T
        # a ReLU SAE's latents go into one kept (P, m) buffer: the fresh arrays otherwise made per
        # image (91 MB each for 1,392 positions x 16,384 latents) cost page faults every view
        workspace = self._take_workspace(tokens) if self._hooked is None else None
        try:
            with torch.inference_mode(), self._autocast():
                z = self.sae.encode(tokens, out=workspace)
            z = z.float()
            return self._sae_result(z, (h, w), t0, progress)
        finally:
            if workspace is not None:
                self._workspace_lock.release()

    def _take_workspace(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The kept latent buffer for ``tokens`` (lock held; release it), or None when in use,
        when the SAE computes in another precision or is not a ReLU SAE."""
        if self.sae.kind != "relu" or self.dtype != torch.float32:
            return None
        if not self._workspace_lock.acquire(blocking=False):
            return None  # another thread is encoding: it gets a fresh array
        shape = (tokens.shape[0], self.sae.d_latent)
        ws = self._workspace
        if ws is None or ws.shape != shape or ws.device != tokens.device:
            ws = self._workspace = torch.empty(shape, dtype=torch.float32, device=tokens.device)
        return ws

    def _sae_result(
        self, z: torch.Tensor, grid: tuple[int, int], t0: float, progress: Progress | None
    ) -> _SaeResult:
        """Compact latents, their mean and the CAM of float32 ``z`` (which is not kept)."""
        h, w = grid
        self._sync()
        t_enc = time.perf_counter() - t0
        pooled_z = z.mean(0).cpu().numpy().astype(np.float32)
        latents = PositionLatents.from_tensor(z)
        cams: dict[bytes, Any] = {}
        if self._hooked is None:
            v = self.head_weights()[2]
            v_t = torch.from_numpy(v.astype(np.float32)).to(z.device)
            cams[v.tobytes()] = (z @ v_t).reshape(h, w).double().cpu().numpy()
        else:  # at a hook point: the rest of the backbone, forward and back
            cams[self._hook_key()] = self._attribute(z, (h, w))
        self._sync()
        if progress is not None:
            progress.update(1)
        return _SaeResult(latents, pooled_z, time.perf_counter() - t0, cams, t_enc)

    def _assemble(
        self,
        record: Any,
        entry: _ImageEntry,
        sae_result: _SaeResult,
        neurons: Iterable[int] | None,
    ) -> Analysis:
        """Head outputs, reconstruction CAM, contributions and the requested latent maps."""
        if entry.features.device.type != "cpu":
            entry.features = entry.features.cpu()
        latents, pooled_z = sae_result.latents, sae_result.pooled
        C, h, wd = entry.features.shape
        extra: dict[str, Any] = {}
        if self._hooked is None:
            w, c, v, bias = self.head_weights()
            contributions = v * pooled_z.astype(np.float64)
            rec_logit = float(contributions.sum() + bias)
            cam = sae_result.cams.get(v.tobytes())  # precise CAM of this head, if computed
            if cam is None:  # another head on cached latents (float16 when stored dense)
                cam = latents.matvec(v).reshape(h, wd)
                sae_result.cams[v.tobytes()] = cam
            cam = cam + bias
            extra["_weights"] = (v, bias)
        else:
            w, c = head_parts(self.classifier)
            contributions, attributions, rec_logit = self._hook_terms(entry, sae_result)
            bias = rec_logit - float(contributions.sum())
            cam = attributions.matvec(np.full(attributions.shape[1], float(h * wd))) + bias
            cam = cam.reshape(h, wd)
            grid = (int(h), int(wd))
            extra["_attributions"] = attributions
            extra["_rerun"] = lambda z, _grid=grid: self._logit_of_latents(_grid, z)
        logit = float(entry.pooled_features @ w + c)
        analysis = Analysis(
            probability=float(sigmoid(logit)),
            logit=logit,
            geometry=entry.geometry,
            grid=(int(h), int(wd)),
            pooled_latents=pooled_z,
            latents=latents,
            pooled_features=entry.pooled_features.astype(np.float32),
            logit_contributions=contributions,
            reconstruction_logit=rec_logit,
            cam=cam.astype(np.float32),
            heatmaps={},
            timings={},
            signature=self.signature,
            sop_instance_uid=str(getattr(record, "sop_instance_uid", "") or ""),
            preprocess=self.preprocess,
            features=_read_only(entry.features.numpy()),
            hook=self.hook,
            **extra,
        )
        wanted = [] if neurons is None else [int(n) for n in neurons]
        if wanted:
            maps = analysis.latent_maps(wanted)
            analysis.heatmaps = {n: maps[i] for i, n in enumerate(wanted)}
        return analysis

    def analyse_many(
        self,
        records: list[Any],
        neurons: Iterable[int] | None = None,
        progress: Progress | None = None,
        *,
        batch_size: int | None = None,
    ) -> list[Analysis]:
        """Analyse several images (an exam) at once: batched backbone, one SAE encode for all.

        Same results as :meth:`analyse` per record (and the same cache). ``batch_size`` images go
        through the backbone together: default all of them on a GPU, 1 on a CPU (ONNX Runtime
        gains nothing from batches there and would hold every view's activations at once). The
        SAE encodes the tokens of every image that needs it in one pass. Per-image timings share
        each batched stage's time equally.
        """
        t_start = time.perf_counter()
        records = list(records)
        check_cancelled(progress)
        if progress is not None:
            progress.set_total(3)
        runtime = self.prepare_runtime(progress)
        keys = [(record_key(r), self._feature_signature(), runtime.name) for r in records]
        entries: dict[tuple, _ImageEntry] = {}
        fresh: list[tuple] = []
        for rec, key in zip(records, keys, strict=True):
            if key in entries:
                continue
            entry = self.cache.get(key)
            if entry is None:
                fresh.append((key, rec))
            else:
                entries[key] = entry
        if batch_size is None:
            batch_size = max(1, len(fresh)) if self.device.type == "cuda" else 1
        if progress is not None:
            progress.set_description(f"preprocessing + backbone ({len(fresh)} images)")
        for i in range(0, len(fresh), max(1, int(batch_size))):
            chunk = fresh[i : i + max(1, int(batch_size))]
            t0 = time.perf_counter()
            pres = [self._preprocess_fn(rec, self.size) for _, rec in chunk]
            x = torch.from_numpy(np.stack([pre.image for pre in pres]))
            if self.device.type == "cuda":
                x = x.pin_memory()
            t_pre = (time.perf_counter() - t0) / len(chunk)
            check_cancelled(progress)
            t0 = time.perf_counter()
            fmaps = runtime(x).to(self.device)  # (n, C, h, w) float32
            pooled = self._pooled_head_features(fmaps)
            self._sync()
            t_bb = (time.perf_counter() - t0) / len(chunk)
            for k, ((key, _), pre) in enumerate(zip(chunk, pres, strict=True)):
                timings = {"preprocess": t_pre, "backbone": t_bb}
                entries[key] = _ImageEntry(fmaps[k], pooled[k], pre.geometry, timings, runtime.name)
            check_cancelled(progress)
        if progress is not None:
            progress.update(1)
            progress.set_description("sparse autoencoder")
        sae_digest = self._digests(self.sae)
        need = [k for k, e in entries.items() if sae_digest not in e.latents]
        sae_seconds = 0.0
        if need:
            t0 = time.perf_counter()
            for key, result in zip(
                need, self._run_sae_many([entries[k] for k in need]), strict=True
            ):
                entries[key].latents[sae_digest] = result
            sae_seconds = (time.perf_counter() - t0) / len(need)
        fresh_keys = {key for key, _ in fresh}
        for key in fresh_keys:  # only now: a cancelled run leaves nothing behind
            self.cache.put(key, entries[key])
        if progress is not None:
            progress.update(1)
            progress.set_description("heatmaps")
        out = []
        for rec, key in zip(records, keys, strict=True):
            t0 = time.perf_counter()
            entry = entries[key]
            result = self._assemble(rec, entry, entry.latents[sae_digest], neurons)
            timings = dict.fromkeys((*STAGES, "sae_encode"), 0.0)
            if key in fresh_keys:
                timings.update(entry.timings)
            if key in need:
                timings["sae"] = timings["sae_encode"] = sae_seconds
            timings["heatmaps"] = time.perf_counter() - t0
            result.timings = timings
            result.cached = key not in fresh_keys
            result.runtime = entry.runtime
            out.append(result)
        total = time.perf_counter() - t_start
        for result in out:
            result.timings["total"] = total / max(1, len(out))
        if progress is not None:
            progress.update(1)
        return out

    def _run_sae_many(self, entries: list[_ImageEntry]) -> list[_SaeResult]:
        """One SAE encode over the tokens of several images, split back per image."""
        fmaps = [e.features.to(self.device) for e in entries]
        counts = [int(f.shape[1] * f.shape[2]) for f in fmaps]
        tokens = torch.cat([f.reshape(f.shape[0], -1).T for f in fmaps])
        t0 = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            z_all = self.sae.encode(tokens)
        z_all = z_all.float()
        self._sync()
        t_enc = (time.perf_counter() - t0) / len(entries)
        if self._hooked is None:
            v = self.head_weights()[2]
            v_t = torch.from_numpy(v.astype(np.float32)).to(z_all.device)
            cams = (z_all @ v_t).double().cpu().split(counts)
        else:  # at a hook point the CAM needs the rest of the backbone (per image, below)
            cams = [None] * len(counts)
        out = []
        for f, z, cam in zip(fmaps, z_all.split(counts), cams, strict=True):
            h, w = int(f.shape[1]), int(f.shape[2])
            pooled_z = z.mean(0).cpu().numpy().astype(np.float32)
            latents = PositionLatents.from_tensor(z)
            if cam is None:
                maps = {self._hook_key(): self._attribute(z, (h, w))}
            else:
                maps = {v.tobytes(): cam.reshape(h, w).numpy()}
            out.append(_SaeResult(latents, pooled_z, t_enc, maps, t_enc))
        return out

    def analyse_path(
        self,
        path: str | Path,
        *,
        frame: int | None = None,
        neurons: Iterable[int] | None = None,
        progress: Progress | None = None,
    ) -> Analysis:
        """Read a DICOM file (dicom.read_mammogram) and analyse it; timings include 'decode'."""
        from ..dicom import read_mammogram

        t0 = time.perf_counter()
        record = read_mammogram(path, frame=frame)
        t_decode = time.perf_counter() - t0
        result = self.analyse(record, neurons=neurons, progress=progress)
        result.timings["decode"] = t_decode
        result.timings["total"] += t_decode
        return result


def latent_attribution(
    sae: Any, classifier: Any, hook: str, z: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, float]:
    """Gradient x activation of a concept classifier's logit on the SAE decoding of per-position
    latents ``z`` (P, m) at ``hook``: ((P, m) float32 on the CPU, the logit). The layers after the
    hook, average pooling and the linear head are run differentiably; at the last layer the logit
    is linear in the latents, so this is exactly (W_dec^T w)_j z_pj / P. The Analyzer's
    contributions and CAM at a hook point and the shortcut report's logit ranking both use it."""
    h, w = grid
    param = sae.W_dec
    # a normal tensor (an encoder under inference_mode makes one autograd cannot follow)
    z = z.detach().to(device=param.device, dtype=param.dtype).clone().requires_grad_(True)
    weight, bias = head_parts(classifier)
    with torch.enable_grad():
        x_hat = sae.decode(z).T.reshape(1, -1, h, w).float()
        feats = x_hat if hook == HEAD else rest_of_backbone(classifier, x_hat, hook)
        w_t = torch.as_tensor(weight, dtype=feats.dtype, device=feats.device)
        logit = feats.mean(dim=(2, 3))[0] @ w_t + float(bias)
        (grad,) = torch.autograd.grad(logit, z)
    return (z.detach() * grad).float().cpu(), float(logit.detach())
