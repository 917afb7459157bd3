"""Clinicians' verdicts on SAE neurons: an SQLite store that never loses or overwrites a verdict.

Each verdict - *clinical*, *spurious* or *unsure*, with an optional note - is one row keyed by the
SAE's hash and the neuron id (plus the image's SOPInstanceUID when the verdict is about one image),
with the rater's name and a UTC timestamp. A changed mind is a new row: the history stays, and
"the" verdict of a rater is their newest row. The database runs in WAL mode with
``synchronous=FULL`` and commits every verdict before :meth:`LabelStore.add` returns, so a verdict
the UI reports as saved is on disk even if the process is killed right after.

Agreement: Cohen's kappa for two raters, Fleiss' kappa for more, and the agreement between the
clinicians' verdicts and the automatic box agreement (a neuron whose top box overlaps an annotation
with IoU >= 0.25 counts as "on the lesion").
"""

from __future__ import annotations

import csv
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .errors import StoreError

VERDICTS = ("clinical", "spurious", "unsure")
SCHEMA_VERSION = 1
CSV_FIELDS = (
    "sae_hash",
    "neuron",
    "image_uid",
    "concept",
    "verdict",
    "rater",
    "note",
    "created_utc",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sae_hash TEXT NOT NULL,
    neuron INTEGER NOT NULL,
    image_uid TEXT NOT NULL DEFAULT '',
    concept TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL CHECK (verdict IN ('clinical', 'spurious', 'unsure')),
    rater TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    created_utc TEXT NOT NULL,
    UNIQUE (sae_hash, neuron, image_uid, rater, created_utc, verdict, note)
);
CREATE INDEX IF NOT EXISTS verdicts_by_neuron ON verdicts (sae_hash, neuron);
"""


def default_path() -> Path:
    """labels.sqlite in the user data directory (platformdirs)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-mammo-sae", appauthor=False)) / "labels.sqlite"


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


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LabelStore:
    """The verdict database (one file; safe for several viewers or processes at once)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._db = None  # set below; closed again if opening fails
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path.name} was written by a newer napari-mammo-sae (schema {row[0]}): "
                    "update the plugin to use it"
                )
        except sqlite3.DatabaseError as exc:
            if getattr(self, "_db", None) is not None:
                self._db.close()
            raise StoreError(f"cannot open the label database: {_hint(exc, self.path)}") from exc
        except OSError as exc:
            raise StoreError(f"cannot create the label database at {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the connection (verdicts are already on disk)."""
        self._db.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
    ) -> int:
        """Store one verdict (committed and synced before returning); returns its row id."""
        verdict = verdict.strip().lower()
        if verdict not in VERDICTS:
            raise StoreError(f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
        rater = (rater or "").strip()
        if not rater:
            raise StoreError("enter a rater name before recording a verdict")
        if not sae_hash:
            raise StoreError("no SAE selected: run the analysis first so verdicts have an SAE key")
        try:
            cur = self._db.execute(
                "INSERT INTO verdicts (sae_hash, neuron, image_uid, concept, verdict, rater, note,"
                " created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sae_hash, int(neuron), image_uid or "", concept or "", verdict, rater, note or "",
                 _now()),
            )  # fmt: skip
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"the verdict was NOT saved: {_hint(exc, self.path)}") from exc
        return int(cur.lastrowid)

    # --- reading -----------------------------------------------------------------------------------
    def _rows(self, sql: str, args: Sequence) -> list[Verdict]:
        try:
            return [Verdict(*r) for r in self._db.execute(sql, args).fetchall()]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot read verdicts: {_hint(exc, self.path)}") from exc

    def history(self, sae_hash: str, neuron: int | None = None) -> list[Verdict]:
        """Every verdict (oldest first), for one neuron or all."""
        sql = "SELECT * FROM verdicts WHERE sae_hash = ?"
        args: list = [sae_hash]
        if neuron is not None:
            sql += " AND neuron = ?"
            args.append(int(neuron))
        return self._rows(sql + " ORDER BY created_utc, id", args)

    def verdicts(
        self,
        sae_hash: str | None = None,
        *,
        neuron: int | None = None,
        rater: str | None = None,
        verdict: str | None = None,
        image_uid: str | None = None,
        concept: str | None = None,
    ) -> list[Verdict]:
        """Every stored verdict matching the given fields (oldest first; None matches anything)."""
        where, args = [], []
        for column, value in (
            ("sae_hash", sae_hash), ("neuron", None if neuron is None else int(neuron)),
            ("rater", rater), ("verdict", verdict), ("image_uid", image_uid), ("concept", concept),
        ):  # fmt: skip
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM verdicts" + (" WHERE " + " AND ".join(where) if where else "")
        return self._rows(sql + " ORDER BY created_utc, id", args)

    def latest(
        self,
        sae_hash: str,
        neuron: int | None = None,
        rater: str | None = None,
        image_uid: str | None = "",
    ) -> list[Verdict]:
        """The newest verdict per (neuron, rater, image) - neuron-level ones by default."""
        newest: dict[tuple, Verdict] = {}
        for v in self.history(sae_hash, neuron):
            if rater is not None and v.rater != rater:
                continue
            if image_uid is not None and v.image_uid != image_uid:
                continue
            newest[(v.neuron, v.rater, v.image_uid)] = v
        return sorted(newest.values(), key=lambda v: (v.neuron, v.rater, v.image_uid))

    def verdict_of(self, sae_hash: str, neuron: int, rater: str | None = None) -> str | None:
        """The current verdict on a neuron: the rater's newest, or the raters' majority."""
        rows = self.latest(sae_hash, neuron, rater)
        if not rows:
            return None
        if rater is not None:
            return rows[-1].verdict
        counts = Counter(v.verdict for v in rows).most_common()
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            return "disputed"
        return counts[0][0]

    def raters(self, sae_hash: str) -> list[str]:
        """Raters with at least one verdict on this SAE."""
        return sorted({v.rater for v in self.history(sae_hash)})

    def counts(self, sae_hash: str) -> dict[str, int]:
        """Current (newest per rater and neuron) verdicts per category."""
        c = Counter(v.verdict for v in self.latest(sae_hash))
        return {k: c.get(k, 0) for k in VERDICTS}

    def spurious_neurons(self, sae_hash: str, rater: str | None = None) -> list[int]:
        """Neurons whose current verdict is spurious (the rater's, or the raters' majority)."""
        neurons = sorted({v.neuron for v in self.latest(sae_hash, rater=rater)})
        return [n for n in neurons if self.verdict_of(sae_hash, n, rater) == "spurious"]

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
        table = {"clinical": {"on": 0, "off": 0}, "spurious": {"on": 0, "off": 0}}
        human, auto = [], []
        for neuron, iou in box_iou.items():
            verdict = self.verdict_of(sae_hash, int(neuron))
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
    def export_csv(self, path: str | Path, sae_hash: str | None = None) -> int:
        """Write every verdict (history included) to a CSV; returns the number of rows."""
        sql, args = "SELECT * FROM verdicts", []
        if sae_hash:
            sql, args = sql + " WHERE sae_hash = ?", [sae_hash]
        rows = self._rows(sql + " ORDER BY created_utc, id", args)
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(CSV_FIELDS)
                for v in rows:
                    writer.writerow([getattr(v, f) for f in CSV_FIELDS])
            tmp.replace(path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}. Choose another folder") from exc
        return len(rows)

    def import_csv(self, path: str | Path) -> int:
        """Merge verdicts from a CSV written by :meth:`export_csv`; returns rows added (re-import adds none)."""
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                missing = set(CSV_FIELDS) - set(reader.fieldnames or [])
                if missing:
                    raise StoreError(
                        f"{Path(path).name} is not a verdict export: missing columns {sorted(missing)}"
                    )
                rows = list(reader)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        added = 0
        self._db.execute("BEGIN")
        try:
            for line, r in enumerate(rows, start=2):
                if r["verdict"] not in VERDICTS or not (r["rater"] or "").strip():
                    raise StoreError(
                        f"{Path(path).name} line {line}: verdict {r['verdict']!r} by rater "
                        f"{r['rater']!r} is not valid (verdicts: {', '.join(VERDICTS)}); nothing "
                        "was imported"
                    )
                if not (r["neuron"] or "").strip().isdigit():
                    raise StoreError(
                        f"{Path(path).name} line {line}: neuron {r['neuron']!r} is not a neuron "
                        "id; nothing was imported"
                    )
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO verdicts (sae_hash, neuron, image_uid, concept, verdict,"
                    " rater, note, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (r["sae_hash"], int(r["neuron"]), r["image_uid"] or "", r["concept"] or "",
                     r["verdict"], r["rater"], r["note"] or "", r["created_utc"]),
                )  # fmt: skip
                added += cur.rowcount
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            self._db.execute("ROLLBACK")
            raise StoreError(f"import failed, nothing imported: {_hint(exc, self.path)}") from exc
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return added


def _hint(exc: sqlite3.DatabaseError, path: Path) -> str:
    """A database error with what to do about it."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return f"{path.name} is locked by another program ({text}); close it and try again"
    if "readonly" in text or "read-only" in text:
        return f"{path} is read-only ({text}): choose a label database in a writable folder"
    if "malformed" in text or "not a database" in text:
        return f"{path} is damaged ({text}): choose another file; this one is left untouched"
    return f"{text} (database {path}): choose another file; this one is left untouched"


# --- kappa statistics --------------------------------------------------------------------------------
def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels (NaN when undefined)."""
    if len(a) != len(b) or not a:
        return float("nan")
    from sklearn.metrics import cohen_kappa_score

    if len(set(a) | set(b)) == 1:
        return 1.0  # perfect agreement on a single category (sklearn returns NaN)
    return float(cohen_kappa_score(list(a), list(b)))


def fleiss_kappa(table: Iterable[Sequence[int]]) -> float:
    """Fleiss' kappa of a subjects x categories count table (same number of raters per subject)."""
    import numpy as np

    t = np.asarray(list(table), dtype=np.float64)
    if t.ndim != 2 or t.shape[0] == 0:
        return float("nan")
    n = t.sum(axis=1)
    if not np.all(n == n[0]) or n[0] < 2:
        return float("nan")
    n = n[0]
    p_j = t.sum(axis=0) / t.sum()
    p_i = (np.sum(t * t, axis=1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), float(np.sum(p_j * p_j))
    if p_e >= 1.0:
        return 1.0
    return float((p_bar - p_e) / (1.0 - p_e))
