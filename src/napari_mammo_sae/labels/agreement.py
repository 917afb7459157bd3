"""Agreement between readers: Cohen's kappa, Fleiss' kappa, Krippendorff's alpha, with bootstrap CIs.

The input is a readers x neurons matrix of verdict codes (``-1`` = that reader gave none). Fleiss'
kappa uses the form for a varying number of ratings per neuron (neurons with fewer than two are
left out); Krippendorff's alpha (nominal) comes from the ``krippendorff`` package and allows
missing verdicts by design; Cohen's kappa needs exactly two readers and the neurons both rated.
Confidence intervals: percentile bootstrap over neurons (the neurons are the sample; readers are
fixed), seeded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

MISSING = -1


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels (NaN when undefined; 1.0 when both use one category)."""
    if len(a) != len(b) or not len(a):
        return float("nan")
    cats = sorted(set(a) | set(b))
    if len(cats) == 1:
        return 1.0
    index = {c: i for i, c in enumerate(cats)}
    return _cohen_codes(np.array([index[x] for x in a]), np.array([index[x] for x in b]), len(cats))


def _cohen_codes(a: np.ndarray, b: np.ndarray, k: int) -> float:
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = float(np.mean(a == b))
    p_e = float(np.dot(np.bincount(a, minlength=k), np.bincount(b, minlength=k))) / (n * n)
    if p_e >= 1.0:
        return 1.0 if p_o >= 1.0 else float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(table: Iterable[Sequence[int]]) -> float:
    """Fleiss' kappa of a subjects x categories count table.

    Subjects may have different numbers of ratings (those with fewer than two are ignored); with
    the same number everywhere this is Fleiss (1971).
    """
    t = np.asarray(list(table), dtype=np.float64)
    if t.ndim != 2 or t.shape[0] == 0:
        return float("nan")
    n = t.sum(axis=1)
    t, n = t[n >= 2], n[n >= 2]
    if t.shape[0] == 0:
        return float("nan")
    p_i = (np.sum(t * t, axis=1) - n) / (n * (n - 1))
    p_j = t.sum(axis=0) / n.sum()
    p_bar, p_e = float(p_i.mean()), float(np.sum(p_j * p_j))
    if p_e >= 1.0:
        return 1.0
    return (p_bar - p_e) / (1.0 - p_e)


def counts_table(codes: np.ndarray, k: int) -> np.ndarray:
    """readers x neurons codes (-1 missing) -> neurons x categories counts."""
    codes = np.asarray(codes)
    return np.stack([(codes == c).sum(axis=0) for c in range(k)], axis=1)


def krippendorff_alpha_counts(counts: np.ndarray) -> float:
    """Krippendorff's alpha (nominal) from a neurons x categories count table."""
    import krippendorff

    counts = np.asarray(counts)
    counts = counts[counts.sum(axis=1) >= 2]
    if counts.shape[0] == 0 or np.count_nonzero(counts.sum(axis=0)) < 2:
        # one category in use: alpha is undefined (0/0); perfect agreement on one value
        return 1.0 if counts.shape[0] else float("nan")
    return float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))


@dataclass
class Estimate:
    """A statistic, its bootstrap percentile CI and the number of neurons it used."""

    value: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        if np.isnan(self.value):
            return f"n/a ({self.n} neurons)"
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}] ({self.n} neurons)"


@dataclass
class Agreement:
    """Agreement statistics of one study (or any readers x neurons verdict matrix)."""

    readers: list[str]
    neurons: list[int]
    fleiss: Estimate
    krippendorff: Estimate
    cohen: Estimate | None  # two readers only
    consensus: dict[int, str]  # neuron -> majority verdict, or "disputed" / "" (no verdict)
    support: dict[int, tuple[int, int]] = field(default_factory=dict)  # neuron -> (votes, ratings)
    n_bootstrap: int = 0
    confidence: float = 0.95


def _ci(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    s = samples[~np.isnan(samples)]
    if s.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(s, [tail, 100 - tail])
    return float(lo), float(hi)


def agreement(
    codes: np.ndarray,
    readers: Sequence[str],
    neurons: Sequence[int],
    categories: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Agreement:
    """All statistics of a readers x neurons code matrix (``-1`` missing), CIs over neurons."""
    codes = np.asarray(codes, dtype=np.int64).reshape(len(readers), len(neurons))
    k = len(categories)
    counts = counts_table(codes, k)  # (neurons, k)
    rated = counts.sum(axis=1)
    multi = rated >= 2
    rng = np.random.default_rng(seed)
    m = len(neurons)
    idx = rng.integers(0, m, size=(n_bootstrap, m)) if m and n_bootstrap else np.zeros((0, m), int)

    fl = fleiss_kappa(counts)
    ka = krippendorff_alpha_counts(counts)
    fl_s = np.array([fleiss_kappa(counts[i]) for i in idx]) if len(idx) else np.array([])
    ka_s = (
        np.array([krippendorff_alpha_counts(counts[i]) for i in idx]) if len(idx) else np.array([])
    )
    cohen = None
    if len(readers) == 2:
        both = (codes[0] >= 0) & (codes[1] >= 0)
        a, b = codes[0], codes[1]
        value = _cohen_codes(a[both], b[both], k) if both.any() else float("nan")
        co_s = np.array([_cohen_codes(a[i][both[i]], b[i][both[i]], k) for i in idx])
        cohen = Estimate(value, *_ci(co_s, confidence), int(both.sum()))

    consensus, support = {}, {}
    for j, neuron in enumerate(neurons):
        c = counts[j]
        total = int(c.sum())
        if total == 0:
            consensus[int(neuron)], support[int(neuron)] = "", (0, 0)
            continue
        top = int(np.argmax(c))
        votes = int(c[top])
        consensus[int(neuron)] = categories[top] if votes * 2 > total else "disputed"
        support[int(neuron)] = (votes, total)
    return Agreement(
        readers=list(readers),
        neurons=[int(n) for n in neurons],
        fleiss=Estimate(fl, *_ci(fl_s, confidence), int(multi.sum())),
        krippendorff=Estimate(ka, *_ci(ka_s, confidence), int(multi.sum())),
        cohen=cohen,
        consensus=consensus,
        support=support,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
    )
