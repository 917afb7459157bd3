"""The verdict store: append-only, never loses or overwrites a verdict, SQLite or PostgreSQL.

Each verdict - *clinical*, *spurious* or *unsure*, with an optional note - is one row keyed by the
SAE's hash and the neuron id (plus the image's SOPInstanceUID when the verdict is about one image),
with the rater's name, a UTC timestamp, an idempotency key (``uid``) and the reading study it
belongs to. A changed mind is a new row: the history stays, and "the" verdict of a rater is their
newest row by insertion order (the row id), whatever the clocks say. :meth:`LabelStore.add`
returns only once the row is committed (SQLite: WAL with ``synchronous=FULL``; PostgreSQL: a
committed transaction), so a verdict the UI reports as saved survives the process being killed.
"""

from __future__ import annotations

import csv
import os
import re
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from ..errors import LabelDatabaseError, StoreError
from . import migrate
from .agreement import cohen_kappa, fleiss_kappa
from .db import PasswordPrompt, Target, connect_checked, describe, parse_target
from .schema import CONTENT_FIELDS, content_uid, verdicts

VERDICTS = ("clinical", "spurious", "unsure")
#: a verdict's content columns, in the CSV's order (the same fields its uid is computed from)
CSV_FIELDS = CONTENT_FIELDS
#: columns an export writes after CSV_FIELDS (an import accepts files without them)
CSV_EXTRA = ("uid", "study")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")


@dataclass(frozen=True)
class Verdict:
    """One stored verdict."""

    id: int
    sae_hash: str
    neuron: int
    image_uid: str
    concept: str
    verdict: str
    rater: str
    note: str
    created_utc: str
    uid: str = ""
    study: str = ""


_COLUMNS = [verdicts.c[f] for f in Verdict.__dataclass_fields__]


def now_utc() -> str:
    """The timestamp format of ``created_utc`` (UTC, microseconds, 'Z')."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_uid() -> str:
    """A fresh idempotency key for a verdict."""
    return str(uuid.uuid4())


def check_timestamp(text: str) -> str:
    """``created_utc`` as stored (``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``); ValueError otherwise."""
    text = (text or "").strip()
    if not _TIMESTAMP.match(text):
        raise ValueError(f"timestamp {text!r} is not UTC ISO 8601 like 2026-12-01T09:30:00.000000Z")
    try:
        datetime.strptime(text.rstrip("Z").split(".")[0], "%Y-%m-%dT%H:%M:%S")  # a real date
    except ValueError:
        raise ValueError(f"timestamp {text!r} is not a real date and time") from None
    return text


class LabelStore:
    """The verdict database: a file path (SQLite, the default) or a ``postgresql://`` URL.

    ``password`` / ``prompt`` are only used by a server that asks for one (see ``db.py``).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        password: str | None = None,
        prompt: PasswordPrompt | None = None,
        migrate_schema: bool = True,
    ) -> None:
        self.target: Target = parse_target(path)
        self.path = self.target.path  # None for a server
        self.engine, self._password = connect_checked(self.target, password, prompt)
        try:
            if migrate_schema:
                migrate.upgrade(self.engine, self.target)
        except BaseException:
            self.engine.dispose()
            raise

    @property
    def display(self) -> str:
        """Where the verdicts are, for messages (file name or user@host:port/db)."""
        return self.target.display

    @property
    def key(self) -> str:
        """The database as a stable key (full path, or the URL without password): outbox rows."""
        return self.target.url.render_as_string(hide_password=True)

    @property
    def user(self) -> str:
        """The database user (PostgreSQL role) verdicts are written as ('' for a file)."""
        return self.target.user if self.target.is_server else ""

    def close(self) -> None:
        """Release connections (verdicts are already committed)."""
        self.engine.dispose()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, exc: BaseException, what: str) -> LabelDatabaseError:
        err = describe(exc, self.target, self._password)
        return type(err)(f"{what}: {err}")

    # --- writing -----------------------------------------------------------------------------------
    def add(
        self,
        sae_hash: str,
        neuron: int,
        verdict: str,
        rater: str,
        note: str = "",
        *,
        image_uid: str | None = None,
        concept: str | None = None,
        uid: str | None = None,
        study: str = "",
        created_utc: str | None = None,
    ) -> int:
        """Store one verdict (committed before returning); returns its row id.

        ``uid`` makes the call idempotent: a verdict already stored under that key is not stored
        again (its existing row id is returned).
        """
        verdict = (verdict or "").strip().lower()
        if verdict not in VERDICTS:
            raise StoreError(f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
        rater = (rater or "").strip()
        if not rater:
            raise StoreError("enter a rater name before recording a verdict")
        if not sae_hash:
            raise StoreError("no SAE selected: run the analysis first so verdicts have an SAE key")
        row = {
            "sae_hash": sae_hash, "neuron": int(neuron), "image_uid": image_uid or "",
            "concept": concept or "", "verdict": verdict, "rater": rater, "note": note or "",
            "created_utc": check_timestamp(created_utc) if created_utc else now_utc(),
            "uid": uid or new_uid(), "study": study or "",
        }  # fmt: skip
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(sa.insert(verdicts).values(row)).inserted_primary_key[0])
        except sa.exc.IntegrityError as exc:
            existing = self._id_of(row["uid"])
            if existing is not None:
                return existing  # sent before (a retry): stored once
            raise self._error(exc, "the verdict was NOT saved") from exc
        except sa.exc.DBAPIError as exc:
            raise self._error(exc, "the verdict was NOT saved") from exc

    def _id_of(self, uid: str) -> int | None:
        try:
            with self.engine.connect() as conn:
                found = conn.execute(sa.select(verdicts.c.id).where(verdicts.c.uid == uid))
                value = found.scalar()
        except sa.exc.DBAPIError as exc:
            raise self._error(exc, "cannot check the verdict") from exc
        return None if value is None else int(value)

    def has_uid(self, uid: str) -> bool:
        """Whether a verdict with this idempotency key is stored (and visible to this user)."""
        return self._id_of(uid) is not None

    # --- reading -----------------------------------------------------------------------------------
    def _select(self, **where: object) -> list[Verdict]:
        q = sa.select(*_COLUMNS)
        for column, value in where.items():
            if value is not None:
                q = q.where(verdicts.c[column] == value)
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(q.order_by(verdicts.c.id)).all()
        except sa.exc.DBAPIError as exc:
            raise self._error(exc, "cannot read verdicts") from exc
        return [Verdict(*r) for r in rows]

    def history(self, sae_hash: str, neuron: int | None = None) -> list[Verdict]:
        """Every verdict (oldest first, in insertion order), for one neuron or all."""
        return self._select(sae_hash=sae_hash, neuron=None if neuron is None else int(neuron))

    def verdicts(
        self,
        sae_hash: str | None = None,
        *,
        neuron: int | None = None,
        rater: str | None = None,
        verdict: str | None = None,
        image_uid: str | None = None,
        concept: str | None = None,
        study: str | None = None,
    ) -> list[Verdict]:
        """Every stored verdict matching the given fields (oldest first; None matches anything)."""
        return self._select(
            sae_hash=sae_hash, neuron=None if neuron is None else int(neuron), rater=rater,
            verdict=verdict, image_uid=image_uid, concept=concept, study=study,
        )  # fmt: skip

    def latest(
        self,
        sae_hash: str,
        neuron: int | None = None,
        rater: str | None = None,
        image_uid: str | None = "",
    ) -> list[Verdict]:
        """The newest verdict per (neuron, rater, image) - neuron-level ones by default."""
        newest: dict[tuple, Verdict] = {}
        for v in self.history(sae_hash, neuron):  # insertion order: the last row wins
            if rater is not None and v.rater != rater:
                continue
            if image_uid is not None and v.image_uid != image_uid:
                continue
            newest[(v.neuron, v.rater, v.image_uid)] = v
        return sorted(newest.values(), key=lambda v: (v.neuron, v.rater, v.image_uid))

    def verdict_of(self, sae_hash: str, neuron: int, rater: str | None = None) -> str | None:
        """The current verdict on a neuron: the rater's newest, or the raters' majority."""
        return _verdict_of(self.latest(sae_hash, neuron, rater), rater)

    def raters(self, sae_hash: str) -> list[str]:
        """Raters with at least one verdict on this SAE."""
        return sorted({v.rater for v in self.history(sae_hash)})

    def counts(self, sae_hash: str) -> dict[str, int]:
        """Current (newest per rater and neuron) verdicts per category."""
        c = Counter(v.verdict for v in self.latest(sae_hash))
        return {k: c.get(k, 0) for k in VERDICTS}

    def spurious_neurons(self, sae_hash: str, rater: str | None = None) -> list[int]:
        """Neurons whose current verdict is spurious (the rater's, or the raters' majority)."""
        by_neuron: dict[int, list[Verdict]] = {}
        for v in self.latest(sae_hash, rater=rater):
            by_neuron.setdefault(v.neuron, []).append(v)
        return sorted(n for n, rows in by_neuron.items() if _verdict_of(rows, rater) == "spurious")

    def _matrix(self, sae_hash: str, raters: Sequence[str]) -> dict[int, dict[str, str]]:
        """neuron -> rater -> verdict for neurons every given rater labelled."""
        table: dict[int, dict[str, str]] = {}
        for v in self.latest(sae_hash):
            if v.rater in raters:
                table.setdefault(v.neuron, {})[v.rater] = v.verdict
        return {n: r for n, r in table.items() if len(r) == len(raters)}

    # --- agreement ---------------------------------------------------------------------------------
    def cohen_kappa(self, rater_a: str, rater_b: str, sae_hash: str) -> tuple[float, int]:
        """(Cohen's kappa, number of neurons both rated)."""
        rows = self._matrix(sae_hash, [rater_a, rater_b])
        a = [r[rater_a] for r in rows.values()]
        b = [r[rater_b] for r in rows.values()]
        return cohen_kappa(a, b), len(a)

    def fleiss_kappa(self, sae_hash: str, raters: Sequence[str] | None = None) -> tuple[float, int]:
        """(Fleiss' kappa, number of neurons every rater rated)."""
        raters = list(raters or self.raters(sae_hash))
        rows = self._matrix(sae_hash, raters)
        table = [
            [sum(1 for v in r.values() if v == cat) for cat in VERDICTS] for r in rows.values()
        ]
        return fleiss_kappa(table), len(table)

    def box_agreement(
        self, sae_hash: str, box_iou: Mapping[int, float], threshold: float = 0.25
    ) -> dict:
        """Clinicians' verdicts vs the automatic box agreement (IoU >= threshold = on the lesion).

        Counts neurons with a clinical or spurious current verdict (majority over raters) and a box
        IoU: ``table[clinical|spurious][on|off]``, the share where they agree (clinical <-> on the
        lesion) and Cohen's kappa of the two.
        """
        by_neuron: dict[int, list[Verdict]] = {}
        for v in self.latest(sae_hash):
            by_neuron.setdefault(v.neuron, []).append(v)
        table = {"clinical": {"on": 0, "off": 0}, "spurious": {"on": 0, "off": 0}}
        human, auto = [], []
        for neuron, iou in box_iou.items():
            verdict = _verdict_of(by_neuron.get(int(neuron), []), None)
            if verdict not in ("clinical", "spurious"):
                continue
            on = "on" if float(iou) >= threshold else "off"
            table[verdict][on] += 1
            human.append(verdict)
            auto.append("clinical" if on == "on" else "spurious")
        n = len(human)
        agree = sum(h == a for h, a in zip(human, auto, strict=True))
        return {
            "table": table,
            "n": n,
            "agreement": agree / n if n else float("nan"),
            "kappa": cohen_kappa(human, auto) if n else float("nan"),
        }

    # --- CSV -----------------------------------------------------------------------------------------
    def export_csv(
        self, path: str | Path, sae_hash: str | None = None, *, study: str | None = None
    ) -> int:
        """Write every verdict (history included) to a CSV; returns the number of rows."""
        rows = self._select(sae_hash=sae_hash or None, study=study)
        return write_verdicts_csv(path, rows)

    def import_csv(self, path: str | Path, *, study: str | None = None) -> int:
        """Merge verdicts from a CSV written by :meth:`export_csv`; returns rows added.

        Every row is checked first (SAE sha256, neuron id, verdict spelling, rater, UTC timestamp);
        one bad row refuses the whole file. Re-importing adds nothing (idempotency keys; rows from
        exports without keys get keys derived from their content). ``study`` files the rows under
        a study (importing a single reader's old verdicts into a study).
        """
        name = Path(path).name
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                missing = set(CSV_FIELDS) - set(reader.fieldnames or [])
                if missing:
                    raise StoreError(
                        f"{name} is not a verdict export: missing columns {sorted(missing)}"
                    )
                raw = list(reader)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        except (UnicodeDecodeError, csv.Error) as exc:
            raise StoreError(
                f"{name} is not a readable CSV file ({exc}); nothing imported"
            ) from exc
        rows = [_checked_row(r, line, name, study) for line, r in enumerate(raw, start=2)]
        added = 0
        try:
            with self.engine.begin() as conn:
                known = {
                    u for (u,) in conn.execute(
                        sa.select(verdicts.c.uid).where(verdicts.c.uid.in_([r["uid"] for r in rows]))
                    )
                } if rows else set()  # fmt: skip
                for r in rows:
                    if r["uid"] in known:
                        continue
                    known.add(r["uid"])
                    conn.execute(sa.insert(verdicts).values(r))
                    added += 1
        except sa.exc.DBAPIError as exc:
            raise self._error(exc, "import failed, nothing imported") from exc
        return added


def _checked_row(r: dict, line: int, name: str, study: str | None) -> dict:
    """One CSV row, validated and normalised (StoreError naming the line otherwise)."""

    def bad(what: str) -> StoreError:
        return StoreError(f"{name} line {line}: {what}; nothing was imported")

    verdict = (r.get("verdict") or "").strip()
    if verdict not in VERDICTS:
        raise bad(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    rater = (r.get("rater") or "").strip()
    if not rater:
        raise bad("the rater is empty")
    sae = (r.get("sae_hash") or "").strip().lower()
    if not _SHA256.match(sae):
        raise bad(f"SAE hash {sae[:70]!r} is not a sha256 (64 hex digits)")
    neuron = (r.get("neuron") or "").strip()
    if not neuron.isdigit():
        raise bad(f"neuron {neuron!r} is not a neuron id")
    try:
        created = check_timestamp(r.get("created_utc") or "")
    except ValueError as exc:
        raise bad(str(exc)) from None
    row = {
        "sae_hash": sae, "neuron": int(neuron), "image_uid": (r.get("image_uid") or "").strip(),
        "concept": (r.get("concept") or "").strip(), "verdict": verdict, "rater": rater,
        "note": r.get("note") or "", "created_utc": created,
    }  # fmt: skip
    row["uid"] = (r.get("uid") or "").strip() or content_uid(row)
    row["study"] = study if study is not None else (r.get("study") or "").strip()
    return row


def write_verdicts_csv(path: str | Path, rows: Sequence[Verdict]) -> int:
    """Write verdict rows as CSV atomically; returns the row count."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_FIELDS + CSV_EXTRA)
            for v in rows:
                writer.writerow([getattr(v, f) for f in CSV_FIELDS + CSV_EXTRA])
        tmp.replace(path)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc}. Choose another folder") from exc
    return len(rows)


def _verdict_of(rows: Sequence[Verdict], rater: str | None) -> str | None:
    if not rows:
        return None
    if rater is not None:
        return rows[-1].verdict
    counts = Counter(v.verdict for v in rows).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "disputed"
    return counts[0][0]
