"""Interventions on SAE latents, in the closed form that average pooling allows.

The concept head is ``logit = w . mean_p x(p) + c``. Replacing each position's feature by the SAE
reconstruction of masked latents, ``x_hat(p) = W_dec (mask * z(p)) + b_dec``, and using that pooling is
linear gives the exact closed form::

    logit = (W_dec^T w) . (mask * mean_p z(p)) + w . b_dec + c

so an intervention is a dot product over the pooled latents (the decoder bias passes through
unchanged). ``v = W_dec^T w`` is each neuron's logit weight; ``v_j * mean_p z_j`` its contribution.

Modes: ``"keep"`` keeps only the given neurons (the paper's top-k activated), ``"remove"`` zeroes them
(top-k deactivated). The top-k neuron set is the union of the top-k of each class, as in the paper.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError

MODES = ("keep", "remove")


# --- model access (plain arrays; any module with the contract's parameter names) ------------------
def head_parts(head: Any) -> tuple[np.ndarray, float]:
    """(w (C,), c) of a linear concept head: a classifier, a ConceptHead, a Linear(C, 1) or (w, c)."""
    if isinstance(head, tuple) and len(head) == 2:
        w, c = head
        return np.asarray(w, dtype=np.float64).reshape(-1), float(c)
    import torch

    module = getattr(head, "head", None) if not isinstance(head, torch.nn.Linear) else None
    module = module if isinstance(module, torch.nn.Module) else head
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(
            f"cannot read a concept head from {type(head).__name__}: pass a classifier, a "
            "ConceptHead, a torch Linear(C, 1) or a (w, c) pair"
        )
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if len(linears) != 1 or linears[0].out_features != 1:
        raise ConfigError(
            "the closed-form intervention needs a head with exactly one Linear(C, 1) layer on the "
            f"pooled features; this head has {len(linears)} linear layers"
        )
    linear = linears[0]
    w = linear.weight.detach().double().cpu().numpy().reshape(-1)
    c = float(linear.bias.detach().double().cpu().item()) if linear.bias is not None else 0.0
    return w, c


def sae_decoder(sae: Any) -> tuple[np.ndarray, np.ndarray]:
    """(W_dec (d, m), b_dec (d,)) of an SAE as float64 numpy arrays."""
    W_dec = sae.W_dec.detach().double().cpu().numpy()
    b_dec = sae.b_dec.detach().double().cpu().numpy()
    return W_dec, b_dec


def tensor_state_key(t: Any) -> tuple:
    """Cheap key that changes when a tensor is replaced, moved or modified in place.

    (id, version counter, storage pointer, dtype, shape, device). In-place changes through
    ``tensor.data`` bypass torch's version counter and are not seen: change weights with
    ``load_state_dict`` or under ``torch.no_grad()``. The one definition used by the memo below and by
    ``models.inference`` (cache keys of an Analyzer's classifier and SAE).
    """
    return (id(t), t._version, t.data_ptr(), str(t.dtype), tuple(t.shape), str(t.device))


def module_state_key(module: Any) -> tuple:
    """:func:`tensor_state_key` of every named parameter and buffer of a module, in order."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return tuple((name, *tensor_state_key(t)) for name, t in tensors)


# (weak references to the decoder tensors, their state keys, w, c) -> (v, bias), most recent last;
# the weak references make a reused id() harmless (a freed tensor's key can never match again)
_MEMO: list[tuple[tuple, tuple, np.ndarray, float, np.ndarray, float]] = []


def _alive(refs: tuple, tensors: tuple) -> bool:
    return all(r() is t for r, t in zip(refs, tensors, strict=True))


def logit_weights(sae: Any, head: Any) -> tuple[np.ndarray, float]:
    """(v = W_dec^T w (m,), bias = w . b_dec + c): the head seen from the SAE latents.

    Computed in float64 and memoised per (decoder tensors, head) so repeated calls (a k sweep) are
    cheap; an in-place change of the decoder (``_version``) recomputes it.
    """
    w, c = head_parts(head)
    tensors = (sae.W_dec, sae.b_dec)
    keys = tuple(tensor_state_key(t) for t in tensors)
    for refs, k, k_w, k_c, v, bias in reversed(_MEMO):
        if k == keys and _alive(refs, tensors) and k_c == c and np.array_equal(k_w, w):
            return v, bias
    W_dec, b_dec = sae_decoder(sae)
    if W_dec.shape[0] != w.shape[0]:
        raise ConfigError(
            f"the head reads {w.shape[0]} features but the SAE reconstructs {W_dec.shape[0]}: use "
            "the head and the SAE trained on the same backbone"
        )
    v, bias = W_dec.T @ w, float(w @ b_dec) + c
    v.setflags(write=False)
    _MEMO.append((tuple(weakref.ref(t) for t in tensors), keys, w, c, v, bias))
    del _MEMO[:-4]
    return v, bias


# --- neuron sets ------------------------------------------------------------------------------------
def topk_union(scores_class0: np.ndarray, scores_class1: np.ndarray, k: int) -> np.ndarray:
    """Sorted union of the k highest-scoring neurons of class 0 and of class 1 (the paper's set)."""
    s0 = np.asarray(scores_class0).reshape(-1)
    s1 = np.asarray(scores_class1).reshape(-1)
    if s0.shape != s1.shape:
        raise ConfigError(f"class scores differ in length ({s0.size} vs {s1.size})")
    k = int(k)
    if k < 0:
        raise ConfigError(f"k must be >= 0 (got {k})")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    a = np.argsort(-s0, kind="stable")[:k]
    b = np.argsort(-s1, kind="stable")[:k]
    return np.union1d(a, b).astype(np.int64)


def _neuron_index(neurons: Iterable[int] | np.ndarray | None, m: int) -> np.ndarray:
    idx = np.asarray([] if neurons is None else neurons, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= m):
        raise ConfigError(f"neuron indices must lie in [0, {m}) for this SAE")
    return np.unique(idx)


def neuron_mask(m: int, neurons: Iterable[int] | np.ndarray | None, mode: str) -> np.ndarray:
    """The (m,) 0/1 mask of an intervention: 1 on ``neurons`` for "keep", 0 on them for "remove"."""
    if mode not in MODES:
        raise ConfigError(f"unknown intervention mode {mode!r}: use one of {', '.join(MODES)}")
    idx = _neuron_index(neurons, m)
    if mode == "keep":
        mask = np.zeros(m, dtype=np.float64)
        mask[idx] = 1.0
    else:
        mask = np.ones(m, dtype=np.float64)
        mask[idx] = 0.0
    return mask


# --- closed form --------------------------------------------------------------------------------
def intervened_logits(
    pooled_latents: np.ndarray, sae: Any, head: Any, neurons: Any, mode: str
) -> np.ndarray:
    """Head logits (N,) on the SAE reconstruction with only ``neurons`` kept or removed (closed form).

    ``pooled_latents`` is (N, m) (or (m,) for one image, giving a scalar); ``head`` is the concept
    head (or the whole classifier, or a (w, c) pair). ``v = W_dec^T w`` is formed in float64; the
    product with the latents runs in their precision (float32 latents: float32 BLAS, ~1e-7 relative).
    """
    z = np.asarray(pooled_latents)
    single = z.ndim == 1
    z = z.reshape(1, -1) if single else z
    v, bias = logit_weights(sae, head)
    if z.shape[1] != v.shape[0]:
        raise ConfigError(
            f"pooled latents have {z.shape[1]} neurons but the SAE has {v.shape[0]}: use the SAE "
            "that produced them"
        )
    if mode == "keep" and not hasattr(z, "tocsr"):
        idx = _neuron_index(neurons, v.shape[0])
        if idx.size <= v.shape[0] // 4:  # few kept neurons: read only their columns
            out = _dot(np.take(z, idx, axis=1), v[idx]) + bias
            return out[0] if single else out
    out = _dot(z, v * neuron_mask(v.shape[0], neurons, mode)) + bias
    return out[0] if single else out


def _dot(z: Any, u: np.ndarray) -> np.ndarray:
    """z @ u as float64; in float32 arithmetic when z is float32/float16 (no float64 copy of z)."""
    if isinstance(z, np.ndarray) and z.dtype in (np.float32, np.float16):
        return np.asarray(z.astype(np.float32, copy=False) @ u.astype(np.float32), dtype=np.float64)
    return np.asarray(z @ u, dtype=np.float64)


def reconstruction_logits(pooled_latents: np.ndarray, sae: Any, head: Any) -> np.ndarray:
    """Head logits (N,) on the full SAE reconstruction (every neuron kept)."""
    return intervened_logits(pooled_latents, sae, head, None, "remove")


def explicit_intervened_logits(
    latents: Any, sae: Any, head: Any, neurons: Any, mode: str
) -> np.ndarray:
    """The slow reference path: decode each position's masked latents, average-pool, apply the head.

    ``latents`` is (N, P, m) (or (P, m) for one image) - per-position latents of N images. Runs in
    the SAE's dtype on its device; used by tests and benchmarks to check :func:`intervened_logits`.
    """
    import torch

    p = next(sae.parameters())
    z = torch.as_tensor(np.asarray(latents) if not torch.is_tensor(latents) else latents)
    z = z.to(device=p.device, dtype=p.dtype)
    z = z.unsqueeze(0) if z.ndim == 2 else z
    m = z.shape[-1]
    mask = torch.as_tensor(neuron_mask(m, neurons, mode), dtype=p.dtype, device=p.device)
    w, c = head_parts(head)
    w_t = torch.as_tensor(w, dtype=p.dtype, device=p.device)
    with torch.inference_mode():
        x_hat = sae.decode(z * mask)  # (N, P, d)
        pooled = x_hat.mean(dim=1)
        logits = pooled @ w_t + c
    return logits.double().cpu().numpy()


def reconstruction_cam(
    latents: Any,
    sae: Any,
    head: Any,
    grid: tuple[int, int] | None = None,
    neurons: Any = None,
    mode: str = "remove",
) -> np.ndarray:
    """Class-activation map of the (masked) reconstruction: v . (mask * z(p)) + w . b_dec + c per position.

    ``latents`` is (P, m) dense or scipy.sparse, or (h, w, m); the mean of the map over positions is
    the intervened logit. Default (no neurons, "remove") is the full reconstruction.
    """
    v, bias = logit_weights(sae, head)
    return _cam(latents, v, bias, grid, neurons, mode)


def _cam(latents: Any, v: np.ndarray, bias: float, grid, neurons, mode) -> np.ndarray:
    shape = None
    if hasattr(latents, "tocsr"):  # scipy.sparse
        z = latents.tocsr()
    else:
        z = np.asarray(latents)
        if z.ndim == 3:
            shape = z.shape[:2]
            z = z.reshape(-1, z.shape[-1])
    if z.shape[1] != v.shape[0]:
        raise ConfigError(f"latents have {z.shape[1]} neurons but the SAE has {v.shape[0]}")
    cam = _dot(z, v * neuron_mask(v.shape[0], neurons, mode)).reshape(-1) + bias
    shape = grid if grid is not None else shape
    return cam.reshape(shape).astype(np.float32) if shape is not None else cam.astype(np.float32)


def sigmoid(x: Any) -> Any:
    """Logistic function, safe for large |x|."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


# --- the slider engine ---------------------------------------------------------------------------
@dataclass(frozen=True)
class InterventionResult:
    """One intervention on one image: the set, its logit/probability and the reconstruction's."""

    mode: str
    neurons: np.ndarray
    logit: float
    probability: float
    reconstruction_logit: float
    reconstruction_probability: float

    @property
    def delta_probability(self) -> float:
        """Change of probability against the full reconstruction."""
        return self.probability - self.reconstruction_probability


class InterventionEngine:
    """Precomputes v = W_dec^T w and each neuron's contribution so a slider update is one small sum.

    ``pooled_latents`` is one image's (m,) mean-over-positions latents; give ``sae`` and ``head``, or
    ``weights=(v, bias)`` from :func:`logit_weights` when they are already computed. Neuron scores
    (for the top-k modes) are per class, (2, m), e.g. from :mod:`analysis.ranking`.
    """

    def __init__(
        self,
        pooled_latents: np.ndarray,
        sae: Any = None,
        head: Any = None,
        *,
        weights: tuple[np.ndarray, float] | None = None,
    ) -> None:
        z = np.asarray(pooled_latents, dtype=np.float64).reshape(-1)
        if weights is None:
            if sae is None or head is None:
                raise ConfigError("an InterventionEngine needs the SAE and the concept head")
            weights = logit_weights(sae, head)
        self.v = np.asarray(weights[0], dtype=np.float64).reshape(-1)
        self.bias = float(weights[1])
        if z.shape[0] != self.v.shape[0]:
            raise ConfigError(
                f"pooled latents have {z.shape[0]} neurons but the SAE has {self.v.shape[0]}"
            )
        self.pooled_latents = z
        self.contributions = self.v * z  # (m,) each neuron's share of the logit
        self.total = float(self.contributions.sum())
        self.reconstruction_logit = self.total + self.bias
        self._ranked: tuple[Any, np.ndarray, np.ndarray] | None = None

    @property
    def n_neurons(self) -> int:
        """Number of SAE latents m."""
        return int(self.v.shape[0])

    def logit(self, neurons: Any, mode: str) -> float:
        """Intervened logit with ``neurons`` kept ("keep") or removed ("remove")."""
        if mode not in MODES:
            raise ConfigError(f"unknown intervention mode {mode!r}: use one of {', '.join(MODES)}")
        idx = _neuron_index(neurons, self.n_neurons)
        part = float(self.contributions[idx].sum()) if idx.size else 0.0
        return (part if mode == "keep" else self.total - part) + self.bias

    def apply(self, neurons: Any, mode: str) -> InterventionResult:
        """The result of keeping or removing a custom neuron set."""
        idx = _neuron_index(neurons, self.n_neurons)
        logit = self.logit(idx, mode)
        rec = self.reconstruction_logit
        return InterventionResult(mode, idx, logit, float(sigmoid(logit)), rec, float(sigmoid(rec)))

    def topk_set(self, scores: np.ndarray, k: int) -> np.ndarray:
        """The paper's set for k: the union of each class's top-k; ``scores`` is (2, m)."""
        s = np.asarray(scores)
        if s.shape != (2, self.n_neurons):
            raise ConfigError(f"scores must be (2, {self.n_neurons}) - one row per class")
        if self._ranked is None or self._ranked[0] is not scores:
            # one cached ranking: a slider moves k, not the scores
            self._ranked = (
                scores,
                np.argsort(-s[0], kind="stable"),
                np.argsort(-s[1], kind="stable"),
            )
        _, o0, o1 = self._ranked
        k = max(0, min(int(k), self.n_neurons))
        return np.union1d(o0[:k], o1[:k]).astype(np.int64)

    def topk_activated(self, scores: np.ndarray, k: int) -> InterventionResult:
        """Keep only the top-k union (the paper's "top-k activated")."""
        return self.apply(self.topk_set(scores, k), "keep")

    def topk_deactivated(self, scores: np.ndarray, k: int) -> InterventionResult:
        """Zero the top-k union (the paper's "top-k deactivated")."""
        return self.apply(self.topk_set(scores, k), "remove")

    def custom(self, neurons: Iterable[int], mode: str = "remove") -> InterventionResult:
        """Keep or remove any neuron set."""
        return self.apply(list(neurons), mode)

    def single(self, neuron: int, mode: str = "keep") -> InterventionResult:
        """Keep only one neuron ("keep") or switch one neuron off ("remove")."""
        return self.apply([int(neuron)], mode)

    def scaled(self, scales: Mapping[int, float]) -> float:
        """Logit with neuron j's latent multiplied by scales[j] (others unchanged)."""
        logit = self.reconstruction_logit
        for j, s in scales.items():
            logit += (float(s) - 1.0) * float(self.contributions[int(j)])
        return logit

    def cam(
        self,
        latents: Any,
        grid: tuple[int, int] | None = None,
        neurons: Any = None,
        mode: str = "remove",
    ) -> np.ndarray:
        """Reconstruction CAM of this image's per-position latents under an intervention."""
        return _cam(latents, self.v, self.bias, grid, neurons, mode)
