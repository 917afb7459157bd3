"""The reader's side of the labelling dock, without Qt (so it is tested headless).

What the dock shows of a neuron (its verdict history, the raters' agreement) and of a study (the
reader's progress), opening a study for a reader, and the database address it may keep (never
with a password). The dock runs the database work in a worker thread for a server.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .db import is_server_url
from .store import LabelStore, Verdict


def without_password(text: str) -> str | None:
    """A server URL with its password taken out (None when it has none: nothing to change)."""
    if not is_server_url(text):
        return None
    from sqlalchemy.engine import make_url

    try:
        url = make_url(text.strip())
    except Exception:  # noqa: BLE001 - parse_target says what is wrong when it is used
        return None
    if url.password is None:
        return None
    return url._replace(password=None).render_as_string(hide_password=False)


def open_reader(
    target: str | os.PathLike | Path,
    study_id: str,
    reader: str | None = None,
    password: str | None = None,
) -> Any:
    """A :class:`~.study.StudyReader` on a connection of its own (closed again when it fails)."""
    from .outbox import Outbox
    from .study import StudyReader

    store = LabelStore(target, password=password)
    try:
        return StudyReader(store, study_id, Outbox(), reader=reader)
    except BaseException:
        store.close()
        raise


def progress_text(reader: Any) -> str:
    """The reader's progress line (HTML): "12 of 40", and what waits in the outbox."""
    done, total = reader.progress()
    waiting = reader.waiting()
    text = f"<b>{done} of {total}</b> neurons in study {reader.design.id}"
    if waiting:
        text += f" - {waiting} queued, will be sent when the server is back"
    elif done == total:
        text += " - all done, thank you"
    return text


def neuron_texts(
    store: LabelStore,
    sae: str,
    neuron: int,
    reader: Any = None,
    box_iou: dict[int, float] | None = None,
) -> tuple[list[str], str]:
    """(history lines, newest first; agreement text) of ``neuron`` under the SAE key ``sae``.

    ``reader`` (a :class:`~.study.StudyReader`): study mode - blinded history and the study's
    agreement. ``box_iou`` (neuron -> IoU of its map with the lesion box, from the explorer):
    adds how the verdicts agree with the boxes.
    """
    rows = store.history(sae, neuron)
    if reader is not None and not any(v.rater == reader.reader for v in rows):
        # blinded: nothing of colleagues' before one's own verdict (the server enforces this
        # for PostgreSQL studies; a local file cannot, so the dock does)
        rows = []
    lines = [history_line(v) for v in reversed(rows)]
    if reader is not None:
        return lines, study_agreement_text(store, reader.design.id)
    return lines, agreement_text(store, sae, box_iou)


def history_line(v: Verdict) -> str:
    """One verdict as the history list shows it."""
    note = f" - {v.note}" if v.note else ""
    where = f" [image ...{v.image_uid[-8:]}]" if v.image_uid else ""
    when = v.created_utc[:16].replace("T", " ") + " UTC"
    return f"{when}  {v.rater}: {v.verdict}{where}{note}"


def study_agreement_text(store: LabelStore, study_id: str) -> str:
    """A reading study's agreement (kappas and alpha with bootstrap intervals)."""
    from .study import study_agreement

    _design, stats = study_agreement(store, study_id, n_bootstrap=200)
    lines = [
        "blinded: colleagues' verdicts on a neuron show once you have given yours"
        + ("" if store.target.is_server else " (a local file: the dock hides them)"),
        f"Fleiss' kappa {stats.fleiss.text()}",
        f"Krippendorff's alpha {stats.krippendorff.text()}",
    ]
    if stats.cohen is not None:
        lines.append(f"Cohen's kappa {stats.cohen.text()}")
    return "\n".join(lines)


def agreement_text(store: LabelStore, sae: str, box_iou: dict[int, float] | None = None) -> str:
    """Free labelling: verdict counts, Cohen's (two raters) or Fleiss' kappa, box agreement."""
    counts = store.counts(sae)
    lines = ["verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items())]
    raters = store.raters(sae)
    if len(raters) == 2:
        kappa, n = store.cohen_kappa(raters[0], raters[1], sae)
        lines.append(f"Cohen's kappa {raters[0]} vs {raters[1]}: {fmt(kappa)} ({n} neurons)")
    elif len(raters) > 2:
        kappa, n = store.fleiss_kappa(sae, raters)
        lines.append(f"Fleiss' kappa, {len(raters)} raters: {fmt(kappa)} ({n} neurons)")
    else:
        lines.append("kappa: needs a second rater")
    if box_iou:
        ious = {n: v for n, v in box_iou.items() if not math.isnan(v)}
        agree = store.box_agreement(sae, ious)
        if agree["n"]:
            t = agree["table"]
            lines.append(
                f"vs box agreement (IoU >= 0.25 = on lesion), {agree['n']} neurons: "
                f"{100 * agree['agreement']:.0f}% agree, kappa {fmt(agree['kappa'])}; "
                f"clinical on/off {t['clinical']['on']}/{t['clinical']['off']}, "
                f"spurious on/off {t['spurious']['on']}/{t['spurious']['off']}"
            )
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    """A kappa with two decimals ('n/a' when undefined)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"
