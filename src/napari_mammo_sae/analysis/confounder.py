"""The confounder test: is a neuron "on the cue" (a planted marker) rather than on the lesions?

One rule, used by ``evaluate`` (results.json, report), ``scripts/summarise_evaluation.py``
(docs/EVALUATION.md, table and summary line alike) and any widget that shows it:

    For each neuron, take its top heatmap box (highest score) on every test image where it gives a
    box. ``iou_cue`` is the mean, over those images that carry the cue, of the box's best IoU with a
    cue box; ``iou_lesion`` the same against the concept's lesion boxes on the images that have
    them. The neuron is **on the cue** when ``iou_cue >= 0.25`` and ``iou_lesion < 0.25`` (or no
    lesion image was scored), and **on a lesion** in the mirror case. 0.25 is Table 2's AP threshold.

``frac_cue`` / ``frac_lesion`` (the share of those images whose IoU reaches 0.25) are reported
alongside but do not enter the rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .localisation import iou_matrix

IOU_THRESHOLD = 0.25

RULE = (
    "a neuron is on the cue when its top heatmap box overlaps the planted cue's box with a mean "
    f"best IoU >= {IOU_THRESHOLD} over the test images that carry the cue, and the lesion boxes "
    f"with a mean best IoU below {IOU_THRESHOLD} (on a lesion: the mirror image; means over the "
    f"images where the neuron gives a box; {IOU_THRESHOLD} is Table 2's AP threshold)"
)


def _undefined(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def on_cue(iou_cue: float | None, iou_lesion: float | None) -> bool:
    """The rule (module docstring): mean IoU with the cue >= 0.25 and with the lesions < 0.25."""
    if _undefined(iou_cue) or iou_cue < IOU_THRESHOLD:  # type: ignore[operator]
        return False
    return _undefined(iou_lesion) or iou_lesion < IOU_THRESHOLD  # type: ignore[operator]


def on_lesion(iou_cue: float | None, iou_lesion: float | None) -> bool:
    """The mirror rule: mean IoU with the lesions >= 0.25 and with the cue < 0.25."""
    return on_cue(iou_lesion, iou_cue)


def neuron_overlaps(
    boxes: Mapping[str, Sequence[Any]],
    lesion: Mapping[str, Sequence[Sequence[float]]],
    cue: Mapping[str, Sequence[Sequence[float]]],
    image_ids: Sequence[str],
) -> dict:
    """One neuron's overlap statistics and verdicts; ``boxes`` maps image id -> its scored boxes
    (best first, objects with a ``.box``), ``lesion``/``cue`` image id -> ground-truth boxes."""
    iou_cue: list[float] = []
    iou_les: list[float] = []
    for image_id in image_ids:
        pred = boxes.get(image_id, [])
        if not pred:
            continue
        top = [pred[0].box]
        if cue.get(image_id):
            iou_cue.append(float(iou_matrix(top, cue[image_id]).max()))
        if lesion.get(image_id):
            iou_les.append(float(iou_matrix(top, lesion[image_id]).max()))

    def mean(v: list[float]) -> float:
        return float(np.mean(v)) if v else math.nan

    def frac(v: list[float]) -> float:
        return float(np.mean([x >= IOU_THRESHOLD for x in v])) if v else math.nan

    mc, ml = mean(iou_cue), mean(iou_les)
    return {
        "iou_cue": mc,
        "iou_lesion": ml,
        "frac_cue": frac(iou_cue),
        "frac_lesion": frac(iou_les),
        "on_cue": on_cue(mc, ml),
        "on_lesion": on_lesion(mc, ml),
    }


def confounder_check(
    boxes: Mapping[int, Mapping[str, Sequence[Any]]],
    lesion: Mapping[str, Sequence[Sequence[float]]],
    cue: Mapping[str, Sequence[Sequence[float]]],
    neurons: Sequence[int],
    image_ids: Sequence[str],
) -> list[dict]:
    """Per neuron (in the given order): ``{neuron, iou_cue, iou_lesion, frac_*, on_cue, on_lesion}``."""
    return [
        {"neuron": int(n), **neuron_overlaps(boxes.get(n, {}), lesion, cue, image_ids)}
        for n in neurons
    ]
