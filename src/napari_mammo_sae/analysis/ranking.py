"""Neuron rankings: which SAE latents are specific to a concept's positive or negative class.

Scores are per class, shaped (2, m): row 0 the negative class, row 1 the positive class; higher means
more specific to that class. Three methods (names used by the CLI and the GUI):

* ``"class-mean"`` - the paper's equation 2: the mean over the class's images of the spatially
  averaged latents, ``s_c = mean_{i in c} mean_p z_i(p)``;
* ``"class-centred"`` - the class mean minus the mean over all images (as in the paper's released
  rank files), which discounts neurons that fire on every image (background, skin line);
* ``"logit"`` - each neuron's mean contribution to the head's logit through the decoder,
  ``(W_dec^T w)_j * s_c[j]``, signed toward the class (negated for the negative class).

``pipeline/probe.py`` (``rank_scores``) and the GUI both score through this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .interventions import logit_weights

RANKINGS = ("class-mean", "class-centred", "logit")
_ALIASES = {
    "class-mean": "class-mean",
    "class_mean": "class-mean",
    "classmean": "class-mean",
    "mean": "class-mean",
    "class-centred": "class-centred",
    "class_centred": "class-centred",
    "class-centered": "class-centred",
    "class_centered": "class-centred",
    "centred": "class-centred",
    "logit": "logit",
    "logit-contribution": "logit",
}


def ranking_name(name: str) -> str:
    """The canonical ranking name ("class-mean", "class-centred" or "logit") of ``name``."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ConfigError(f"unknown ranking {name!r}: use one of {', '.join(RANKINGS)}")
    return _ALIASES[key]


def _means(class_means: np.ndarray) -> np.ndarray:
    means = np.asarray(class_means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] != 2:
        raise ConfigError(
            f"class means must be (2, m) - row 0 negative, row 1 positive - not {means.shape}"
        )
    return means


def class_mean_scores(class_means: np.ndarray) -> np.ndarray:
    """The paper's score (equation 2): the class-wise mean pooled latents themselves, (2, m)."""
    return _means(class_means).copy()


def overall_mean(class_means: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean over all images from the two class means and their image counts."""
    means = _means(class_means)
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    if n.shape != (2,) or n.sum() <= 0:
        raise ConfigError("counts must give the number of images of each of the two classes")
    return (n[:, None] * means).sum(0) / n.sum()


def class_centred_scores(
    class_means: np.ndarray,
    overall: np.ndarray | None = None,
    *,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Class mean minus the mean over all images, (2, m); give ``overall`` or the class ``counts``."""
    means = _means(class_means)
    if overall is None:
        if counts is None:
            raise ConfigError(
                "the class-centred score needs the overall mean or the images per class (counts)"
            )
        overall = overall_mean(means, counts)
    return means - np.asarray(overall, dtype=np.float64).reshape(1, -1)


def logit_contributions(pooled_latents: np.ndarray, sae: Any, head: Any) -> np.ndarray:
    """Each neuron's share of the reconstruction logit, (W_dec^T w)_j * mean_p z_j; (m,) or (N, m)."""
    v, _ = logit_weights(sae, head)
    z = np.asarray(pooled_latents, dtype=np.float64)
    if z.shape[-1] != v.shape[0]:
        raise ConfigError(f"pooled latents have {z.shape[-1]} neurons but the SAE has {v.shape[0]}")
    return z * v


def logit_scores(class_means: np.ndarray, sae: Any, head: Any) -> np.ndarray:
    """Mean logit contribution per class, signed toward the class (row 0 negated), (2, m)."""
    contrib = logit_contributions(_means(class_means), sae, head)
    return np.stack([-contrib[0], contrib[1]])


def scores(
    method: str,
    class_means: np.ndarray,
    *,
    overall: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    sae: Any = None,
    head: Any = None,
) -> np.ndarray:
    """Per-class scores (2, m) under a named ranking method."""
    method = ranking_name(method)
    if method == "class-mean":
        return class_mean_scores(class_means)
    if method == "class-centred":
        return class_centred_scores(class_means, overall, counts=counts)
    if sae is None or head is None:
        raise ConfigError("the logit ranking needs the SAE and the concept head")
    return logit_scores(class_means, sae, head)


def rank(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices of the k highest scores, best first (ties keep index order); all when k is None."""
    s = np.asarray(scores).reshape(-1)
    order = np.argsort(-s, kind="stable")
    return order if k is None else order[: max(0, int(k))]
