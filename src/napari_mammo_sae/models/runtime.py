"""Backbone runtimes: what runs ``forward_features`` - PyTorch (any device) or ONNX Runtime (CPU).

On a workstation CPU, ONNX Runtime runs Mammo-CLIP's EfficientNet-B5 at 1520 x 912 in about a
quarter of PyTorch eager's time (BENCHMARKS.md, "Backbone runtimes"); on a GPU PyTorch is the fast
one (autocast, channels_last). :func:`create_runtime` picks and builds one:

* ``torch``: eager PyTorch on the model's device; on CUDA with channels_last and optional
  float16/bfloat16 autocast. Hooks and gradients work only here (the other runtimes run a graph).
* ``onnx``: the backbone exported once to ONNX (legacy TorchScript exporter, fixed input size,
  dynamic batch) and run by ONNX Runtime's CPU execution provider. The export is cached in the user
  cache folder, keyed by the weights' sha256, the architecture, the input size, the opset and the
  exporter's version; it is checked against PyTorch on export (max relative difference <= 1e-4),
  written atomically, and its sha256 is re-checked on every load: a stale or corrupt file is
  exported again.
* ``auto``: ``onnx`` on the CPU (float32) when onnxruntime imports, else ``torch``; if the export
  fails, ``auto`` logs why and falls back to ``torch`` (``onnx`` asked for by name raises
  :class:`~napari_mammo_sae.errors.BackboneRuntimeError`).

ONNX Runtime's intra-op threads follow ``OMP_NUM_THREADS`` when set, else torch's thread count.
``NAPARI_MAMMO_SAE_RUNTIME`` sets the default runtime name; ``NAPARI_MAMMO_SAE_CACHE_DIR`` the cache
folder (else ``platformdirs.user_cache_dir("napari-mammo-sae")/onnx``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import BackboneRuntimeError, ConfigError
from ..progress import Progress, check_cancelled

log = logging.getLogger(__name__)

RUNTIME_CHOICES = ("auto", "torch", "onnx")
DEFAULT_OPSET = 17
#: bump when the export recipe changes: every cached export is then made again
EXPORT_FORMAT = 1
#: an export must match PyTorch to this relative difference (max |a - b| / max |b|)
EXPORT_TOLERANCE = 1e-4
#: cached exports kept per cache folder (least recently used removed first)
CACHE_KEEP = 6
ENV_RUNTIME = "NAPARI_MAMMO_SAE_RUNTIME"
ENV_CACHE = "NAPARI_MAMMO_SAE_CACHE_DIR"
AUTOCAST_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackboneRuntime(Protocol):
    """Runs a backbone's ``forward_features`` on an (N, 3, H, W) batch -> (N, C, h, w) float32."""

    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


# --- choosing ------------------------------------------------------------------------------------
def onnxruntime_available() -> bool:
    """True when ``import onnxruntime`` works."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_runtime() -> str:
    """The runtime name used when none is given: ``$NAPARI_MAMMO_SAE_RUNTIME`` or ``auto``."""
    return os.environ.get(ENV_RUNTIME, "").strip().lower() or "auto"


def resolve_runtime(name: str | None, device: torch.device | str, dtype: str = "float32") -> str:
    """The concrete runtime (``torch`` or ``onnx``) for a requested name on a device."""
    name = default_runtime() if name is None else str(name).lower()
    if name not in RUNTIME_CHOICES:
        raise ConfigError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIME_CHOICES)}")
    device = torch.device(device)
    if name == "torch":
        return "torch"
    usable = device.type == "cpu" and dtype == "float32" and onnxruntime_available()
    if name == "auto":
        return "onnx" if usable else "torch"
    if device.type != "cpu":
        raise ConfigError(
            f"the onnx runtime runs on the CPU, not {device.type}: use runtime torch (or auto) there"
        )
    if dtype != "float32":
        raise ConfigError("the onnx runtime runs float32 only: use dtype float32 or runtime torch")
    if not onnxruntime_available():
        raise ConfigError("the onnx runtime needs ONNX Runtime: pip install onnxruntime")
    return "onnx"


def ort_threads() -> int:
    """ONNX Runtime intra-op threads: ``OMP_NUM_THREADS`` when set to a positive number, else torch's."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        n = 0
    return n if n > 0 else max(1, torch.get_num_threads())


def cache_dir() -> Path:
    """Where exported graphs are cached (``$NAPARI_MAMMO_SAE_CACHE_DIR`` or the user cache folder)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-mammo-sae")) / "onnx"


# --- torch ---------------------------------------------------------------------------------------
class TorchRuntime:
    """Eager PyTorch: inference mode, optional autocast, channels_last on CUDA."""

    name = "torch"

    def __init__(
        self,
        module: nn.Module,
        *,
        device: torch.device | str = "cpu",
        dtype: str = "float32",
        channels_last: bool | None = None,
        forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if dtype not in AUTOCAST_DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}: use {', '.join(AUTOCAST_DTYPES)}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.module = module
        self.forward = forward if forward is not None else module.forward_features
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last:
            module.to(memory_format=torch.channels_last)

    def _autocast(self):
        target = AUTOCAST_DTYPES[self.dtype]
        if target is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=target)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, h, w) float32 of images (N, 3, H, W), on the runtime's device."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            out = self.forward(x)
        return out.float().contiguous()

    def describe(self) -> str:
        """Short text for status lines: ``torch (cuda, bfloat16, channels_last)``."""
        extra = [self.device.type]
        if self.dtype != "float32":
            extra.append(self.dtype)
        if self.channels_last:
            extra.append("channels_last")
        return f"torch ({', '.join(extra)})"


# --- ONNX Runtime --------------------------------------------------------------------------------
class _Features(nn.Module):
    """``forward = module.forward_features``: what is exported."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_features(x)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's parameter and buffer names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def export_key(
    module: nn.Module,
    size: tuple[int, int],
    *,
    opset: int = DEFAULT_OPSET,
    weights: str | None = None,
) -> dict[str, Any]:
    """What an export depends on: weights sha256, structure, input size, opset, exporter version."""
    from .backbone import backbone_name

    arch = backbone_name(module)
    meta = {
        "format": EXPORT_FORMAT,
        "arch": arch,
        "weights_sha256": weights or weights_sha256(module),
        # the module tree with its hyper-parameters (static pads included): the graph's shape
        "structure_sha256": hashlib.sha256(repr(module).encode()).hexdigest(),
        "input_size": [int(size[0]), int(size[1])],
        "opset": int(opset),
        "torch": torch.__version__.split("+")[0],
    }
    meta["key"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return meta


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: no per-session chatter on the shell
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _relative_difference(got: torch.Tensor, expect: torch.Tensor) -> float:
    scale = float(expect.abs().max())
    return float((got - expect).abs().max()) / max(scale, 1e-30)


_SESSIONS: OrderedDict[tuple, Any] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
_SESSIONS_KEEP = 3


class OnnxRuntime:
    """ONNX Runtime (CPU execution provider) on a cached export of ``forward_features``."""

    name = "onnx"

    def __init__(self, path: Path, meta: dict[str, Any], *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.meta = dict(meta)
        self.size = tuple(int(v) for v in meta["input_size"])
        self.threads = threads or ort_threads()
        #: True when this object made the export (first use of these weights and size)
        self.exported = False
        self.export_seconds = 0.0
        key = (str(self.path), meta["key"], self.threads)
        with _SESSIONS_LOCK:
            session = _SESSIONS.get(key)
            if session is None:
                try:
                    session = _session(self.path, self.threads)
                except Exception as exc:  # onnxruntime raises its own, untyped, exceptions
                    raise BackboneRuntimeError(
                        f"ONNX Runtime cannot load {self.path.name}: {exc}".strip()
                    ) from exc
                _SESSIONS[key] = session
                while len(_SESSIONS) > _SESSIONS_KEEP:
                    _SESSIONS.popitem(last=False)
            _SESSIONS.move_to_end(key)
        self.session = session
        self._input = session.get_inputs()[0].name

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        size: tuple[int, int],
        *,
        opset: int = DEFAULT_OPSET,
        folder: str | Path | None = None,
        progress: Progress | None = None,
        weights: str | None = None,
        threads: int | None = None,
    ) -> OnnxRuntime:
        """The cached export of ``module.forward_features`` at ``size``, made (again) if needed."""
        meta = export_key(module, size, opset=opset, weights=weights)
        folder = Path(folder) if folder is not None else cache_dir()
        stem = f"{meta['arch']}-{size[0]}x{size[1]}-opset{opset}-{meta['key'][:20]}"
        path, sidecar = folder / f"{stem}.onnx", folder / f"{stem}.json"
        stored = _read_sidecar(sidecar)
        if stored is not None and stored.get("key") == meta["key"] and path.exists():
            if _sha256_file(path) == stored.get("onnx_sha256"):
                try:
                    runtime = cls(path, stored, threads=threads)
                except BackboneRuntimeError as exc:
                    log.warning("cached ONNX export unusable (%s): exporting again", exc)
                else:
                    _touch(path)
                    return runtime
            else:
                log.warning("cached ONNX export %s is corrupt: exporting again", path.name)
        elif path.exists() or sidecar.exists():
            log.info("cached ONNX export %s is stale: exporting again", path.name)
        t0 = time.perf_counter()
        stored = export_onnx(module, size, path, meta=meta, progress=progress)
        runtime = cls(path, stored, threads=threads)
        runtime.exported = True
        runtime.export_seconds = time.perf_counter() - t0
        _prune(folder, keep=CACHE_KEEP, current=path)
        return runtime

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, h, w) float32 (CPU) of images (N, 3, H, W)."""
        if tuple(x.shape[-2:]) != self.size:
            raise ConfigError(
                f"this ONNX export takes {self.size[0]}x{self.size[1]} inputs, not "
                f"{x.shape[-2]}x{x.shape[-1]}: make the runtime for that size"
            )
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        try:
            (out,) = self.session.run(None, {self._input: arr})
        except Exception as exc:  # onnxruntime's own exception types
            raise BackboneRuntimeError(f"ONNX Runtime failed on the backbone: {exc}") from exc
        return torch.from_numpy(out)

    def describe(self) -> str:
        """Short text for status lines: ``onnx (CPU, 2 threads)``."""
        return f"onnx (CPU, {self.threads} threads)"


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _prune(folder: Path, *, keep: int, current: Path) -> None:
    """Remove the least recently used exports beyond ``keep`` (never ``current``)."""
    files = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in files if p != current][max(0, keep - 1) :]:
        for p in (old, old.with_suffix(".json")):
            try:
                p.unlink()
            except OSError:
                pass


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def export_onnx(
    module: nn.Module,
    size: tuple[int, int],
    path: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    progress: Progress | None = None,
    tolerance: float = EXPORT_TOLERANCE,
) -> dict[str, Any]:
    """Export ``module.forward_features`` at ``size`` to ``path`` (+ ``.json``), checked against torch.

    The graph is written to a temporary file, compared with PyTorch on a random input, and only
    then moved into place; the JSON sidecar (key, sha256 of the graph, measured difference) goes
    last, so a file without a matching sidecar is never trusted. Returns the sidecar's content.
    """
    path = Path(path)
    meta = dict(meta or export_key(module, size, opset=opset))
    opset = int(meta["opset"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackboneRuntimeError(
            f"cannot create the ONNX cache folder {path.parent}: {exc.strerror or exc}; set "
            f"{ENV_CACHE} to a writable folder or use runtime torch"
        ) from exc
    check_cancelled(progress)
    if progress is not None:
        progress.set_description(
            f"exporting the backbone to ONNX (once for these weights, {size[0]}x{size[1]})"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    wrapper = _Features(module)
    was_training = module.training
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, 3, int(size[0]), int(size[1]), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    t0 = time.perf_counter()
    try:
        wrapper.eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation chatter
            torch.onnx.export(
                wrapper,
                (x,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                training=torch.onnx.TrainingMode.EVAL,
                do_constant_folding=True,
                input_names=["image"],
                output_names=["features"],
                dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            )
        if progress is not None:
            progress.set_description("checking the ONNX export against PyTorch")
        check_cancelled(progress)
        with torch.inference_mode():
            expect = wrapper(x).float().cpu()
        session = _session(tmp, ort_threads())
        (got,) = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
        diff = _relative_difference(torch.from_numpy(got), expect)
        if not diff <= tolerance:
            raise BackboneRuntimeError(
                f"the ONNX export of {meta['arch']} differs from PyTorch by {diff:.1e} (relative; "
                f"allowed {tolerance:.0e}): use runtime torch"
            )
        os.replace(tmp, path)
    except BackboneRuntimeError:
        raise
    except OSError as exc:
        raise BackboneRuntimeError(
            f"cannot write the ONNX export to {path.parent}: {exc.strerror or exc}; set "
            f"{ENV_CACHE} to a writable folder or use runtime torch"
        ) from exc
    except Exception as exc:  # exporter / onnxruntime failures: unsupported op, bad graph, ...
        raise BackboneRuntimeError(
            f"cannot export {meta['arch']} to ONNX ({type(exc).__name__}: {exc}): use runtime torch"
        ) from exc
    finally:
        module.train(was_training)
        if tmp.exists():
            tmp.unlink()
    meta.update(
        onnx_sha256=_sha256_file(path),
        max_relative_difference=diff,
        export_seconds=round(time.perf_counter() - t0, 3),
    )
    _write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
    log.info("exported %s to %s (max rel. difference %.1e)", meta["arch"], path.name, diff)
    return meta


# --- the one entry point -------------------------------------------------------------------------
def create_runtime(
    module: nn.Module,
    name: str | None = "auto",
    *,
    size: tuple[int, int],
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Progress | None = None,
    folder: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    weights: str | None = None,
    channels_last: bool | None = None,
) -> TorchRuntime | OnnxRuntime:
    """A runtime for ``module.forward_features`` at input ``size`` on ``device``.

    ``forward`` overrides what the torch runtime calls (e.g. a classifier's ``forward_features``);
    ``weights`` is the module's sha256 when the caller already has it.
    """
    resolved = resolve_runtime(name, device, dtype)
    if resolved == "onnx":
        try:
            return OnnxRuntime.from_module(
                module, size, opset=opset, folder=folder, progress=progress, weights=weights
            )
        except BackboneRuntimeError as exc:
            if (default_runtime() if name is None else str(name).lower()) != "auto":
                raise
            log.warning("ONNX Runtime not usable for this backbone (%s): using PyTorch", exc)
    return TorchRuntime(
        module, device=device, dtype=dtype, channels_last=channels_last, forward=forward
    )
