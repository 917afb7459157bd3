"""Neuron rankings: which SAE latents are specific to a concept's positive or negative class.

Scores are per class, shaped (2, m): row 0 the negative class, row 1 the positive class; higher means
more specific to that class. Three methods (names used by the CLI and the GUI):

* ``"class-mean"`` - the paper's equation 2: the mean over the class's images of the spatially
  averaged latents, ``s_c = mean_{i in c} mean_p z_i(p)``;
* ``"class-centred"`` - the class mean minus the mean over all images (as in the paper's released
  rank files), which discounts neurons that fire on every image (background, skin line);
* ``"logit"`` - each neuron's mean contribution to the head's logit through the decoder,
  ``(W_dec^T w)_j * s_c[j]``, signed toward the class (negated for the negative class).

Those hyphenated names are the one spelling (CLI choices, probe files, reports); the underscore
spellings (``class_mean``, ``class_centred``) and a few others are accepted as aliases everywhere a
name is read (:func:`ranking_name`, :class:`RankingTable`).

Class means (:class:`ClassMeans`) are defined here once: the mean over a class's images of the
pooled latents; an empty class has an undefined (NaN) mean, and a ranking refuses it with a
ConfigError rather than ranking against zeros. ``pipeline/probe.py``, ``pipeline/evaluate.py`` and
the GUI all score through this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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


class RankingTable(dict):
    """A dict keyed by ranking name that also answers to the aliases (``"class_mean"``...)."""

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        for k, v in (items or {}).items():
            self[k] = v

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(ranking_name(key), value)

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(ranking_name(key))

    def __contains__(self, key: object) -> bool:
        try:
            return super().__contains__(ranking_name(str(key)))
        except ConfigError:
            return False

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


# --- class means (equation 2) -------------------------------------------------------------------
@dataclass
class ClassMeans:
    """Class-wise mean pooled latents over a split: row 0 class 0 (negative), row 1 class 1."""

    mean: np.ndarray  # (2, m); NaN rows for a class without images
    count: np.ndarray  # (2,) images per class
    overall: np.ndarray  # (m,) mean over the images of both classes (NaN when there are none)

    @classmethod
    def from_sums(cls, sums: np.ndarray, count: np.ndarray) -> ClassMeans:
        """From per-class sums of pooled latents (2, m) and image counts (2,)."""
        sums = np.asarray(sums, dtype=np.float64)
        n = np.asarray(count, dtype=np.int64).reshape(-1)
        if sums.ndim != 2 or sums.shape[0] != 2 or n.shape != (2,):
            raise ConfigError("class sums must be (2, m) with two class counts")
        mean = np.full_like(sums, np.nan)
        for c in (0, 1):
            if n[c] > 0:
                mean[c] = sums[c] / n[c]
        total = int(n.sum())
        overall = sums.sum(0) / total if total else np.full(sums.shape[1], np.nan)
        return cls(mean=mean, count=n, overall=overall)

    @property
    def complete(self) -> bool:
        """Both classes have at least one image (only then are the rankings defined)."""
        return bool((np.asarray(self.count) > 0).all())

    def require_complete(self, what: str = "this concept") -> ClassMeans:
        """Self, or ConfigError naming the counts when a class has no images."""
        if not self.complete:
            n = np.asarray(self.count)
            raise ConfigError(
                f"the split has {n[1]} positive and {n[0]} negative images for {what}: "
                "both classes are needed to rank neurons"
            )
        return self


def rank_scores(means: ClassMeans, sae: Any = None, head: Any = None) -> RankingTable:
    """Per-class scores (2, m) of every ranking method that applies (``logit`` needs the head).

    ``means`` is a :class:`ClassMeans` (or anything with its ``mean``/``count``/``overall``).
    ConfigError when a class has no images (its mean is undefined).
    """
    if not isinstance(means, ClassMeans):
        means = ClassMeans(
            np.asarray(means.mean), np.asarray(means.count), np.asarray(means.overall)
        )
    means.require_complete()
    out = RankingTable(
        {
            "class-mean": class_mean_scores(means.mean),
            "class-centred": class_centred_scores(means.mean, means.overall),
        }
    )
    if head is not None and sae is not None:
        out["logit"] = logit_scores(means.mean, sae, head)
    return out


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
