"""A reading study: several readers label the same neurons, blinded, in their own random order.

A coordinator creates it (:func:`create_study`) from an SAE (sha256), a concept, a neuron set
(:func:`choose_neurons`: the top-k of each class plus random controls, so agreement is not only
measured on easy neurons) and a list of readers. On PostgreSQL each reader is a database role: the
study grants it INSERT and SELECT on the verdicts, and the row-level security policies of the
schema (``migrations/versions/0003_blinding.py``) let it write only under its own name, never
update or delete, and see a colleague's verdict on a neuron only after giving its own.

A reader works through :class:`StudyReader`: their queue in their own seeded order, progress
("12 of 40"), and verdicts sent at once when nothing is waiting; "saved" means the server
committed it. When the server cannot take it (restarted, network dropped) the verdict goes to the
local :class:`~.outbox.Outbox` (committed to disk) and the reader sees "queued"; later verdicts
queue behind it, and the outbox is flushed in order when the server is back.
The coordinator reads everything: :func:`study_agreement`, :func:`study_status`, :func:`export_study`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from ..errors import (
    DatabaseUnavailableError,
    LabelDatabaseError,
    PermissionRefusedError,
    StudyError,
)
from .agreement import Agreement, agreement
from .outbox import Outbox
from .schema import studies, study_neurons, study_readers
from .store import VERDICTS, LabelStore, new_uid, now_utc, write_verdicts_csv

_STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_READER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # a PostgreSQL role name that needs no quoting
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StudyDesign:
    """What a study is: the SAE, concept, neurons (with why each was chosen), readers, seed."""

    id: str
    sae_hash: str
    concept: str
    seed: int
    neurons: dict[int, str]  # neuron -> source ("top class 1", "top class 0", "control", "given")
    readers: tuple[str, ...]
    coordinator: str
    created_utc: str

    def order(self, reader: str) -> list[int]:
        """The reader's own random order of the neurons (seeded by the study seed and the name)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(reader.encode())])
        neurons = sorted(self.neurons)
        return [neurons[i] for i in rng.permutation(len(neurons))]


def choose_neurons(
    *,
    top: Mapping[int, Sequence[int]] | None = None,
    given: Sequence[int] = (),
    controls: int = 0,
    n_latents: int | None = None,
    seed: int = 0,
) -> dict[int, str]:
    """The neuron set: given ids, the top lists per class, and ``controls`` random other neurons."""
    chosen: dict[int, str] = {}
    for n in given:
        chosen.setdefault(int(n), "given")
    for cls, neurons in sorted((top or {}).items(), reverse=True):
        for n in neurons:
            chosen.setdefault(int(n), f"top class {cls}")
    if controls:
        if not n_latents:
            raise StudyError("random control neurons need the SAE's number of latents")
        rest = np.array(sorted(set(range(int(n_latents))) - set(chosen)))
        if len(rest) < controls:
            raise StudyError(f"only {len(rest)} neurons are left for {controls} controls")
        rng = np.random.default_rng([seed, 0x636F6E74])
        for n in rng.choice(rest, size=controls, replace=False):
            chosen[int(n)] = "control"
    if not chosen:
        raise StudyError("the study has no neurons: give neuron ids, a probe for top-k, or both")
    return chosen


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of a password (what psql's \\password sends).

    Setting a role's password as a verifier keeps the password itself out of the statement, the
    server's statement log and pg_stat_activity.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def create_study(
    store: LabelStore,
    study_id: str,
    *,
    sae_hash: str,
    concept: str,
    neurons: Mapping[int, str],
    readers: Sequence[str],
    seed: int = 0,
    reader_passwords: Mapping[str, str] | None = None,
) -> StudyDesign:
    """Record a new study; on PostgreSQL also create the reader roles and their privileges."""
    if not _STUDY_ID.match(study_id or ""):
        raise StudyError(
            f"study id {study_id!r}: use letters, digits, '_', '.', '-' (at most 64 characters)"
        )
    sae_hash = (sae_hash or "").strip().lower()
    if not _SHA256.match(sae_hash):
        raise StudyError("the SAE must be given by its sha256 (64 hex digits)")
    readers = list(dict.fromkeys(r.strip() for r in readers))
    bad = [r for r in readers if not _READER.match(r)]
    if bad or len(readers) < 1:
        raise StudyError(
            f"reader names {bad or readers} are not usable as database roles: lower-case letters, "
            "digits and '_', starting with a letter"
        )
    if not neurons:
        raise StudyError("the study has no neurons")
    if reader_passwords and store.engine.dialect.name != "postgresql":
        raise StudyError("reader passwords belong to a study server: a local file has no logins")
    design = StudyDesign(
        study_id, sae_hash, concept, int(seed), {int(n): s for n, s in neurons.items()},
        tuple(readers), store.user or "coordinator", now_utc(),
    )  # fmt: skip
    try:
        with store.engine.begin() as conn:
            if conn.execute(sa.select(studies.c.id).where(studies.c.id == study_id)).first():
                raise StudyError(f"a study {study_id!r} exists already in {store.display}")
            conn.execute(
                sa.insert(studies).values(
                    id=study_id, sae_hash=sae_hash, concept=concept, seed=int(seed),
                    created_utc=design.created_utc, coordinator=design.coordinator,
                    design=json.dumps({"sources": {str(k): v for k, v in design.neurons.items()}}),
                )
            )  # fmt: skip
            conn.execute(
                sa.insert(study_readers), [{"study": study_id, "reader": r} for r in readers]
            )
            conn.execute(
                sa.insert(study_neurons),
                [{"study": study_id, "neuron": n, "source": s} for n, s in design.neurons.items()],
            )
            if store.engine.dialect.name == "postgresql":
                _grant_readers(conn, readers, reader_passwords or {})
    except sa.exc.DBAPIError as exc:
        raise store._error(exc, f"study {study_id!r} was NOT created") from exc
    return design


def _grant_readers(conn: sa.Connection, readers: Sequence[str], passwords: Mapping[str, str]):
    """One login role per reader (created when missing) with append-only, blinded access."""
    quote = conn.dialect.identifier_preparer.quote
    for reader in readers:
        role = quote(reader)
        exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": reader})
        if exists.first() is None:
            conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        if passwords.get(reader):
            verifier = scram_verifier(passwords[reader])
            conn.exec_driver_sql(
                f"ALTER ROLE {role} PASSWORD '{verifier}'"
            )  # a hash, not the password
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON verdicts TO {role}")
        conn.exec_driver_sql(f"GRANT USAGE ON SEQUENCE verdicts_id_seq TO {role}")
        conn.exec_driver_sql(
            f"GRANT SELECT ON studies, study_readers, study_neurons, alembic_version, "
            f"schema_version TO {role}"
        )
        conn.exec_driver_sql(
            f"GRANT EXECUTE ON FUNCTION mammo_has_own_verdict(text, text, integer, text) TO {role}"
        )


def open_study(store: LabelStore, study_id: str) -> StudyDesign:
    """Read a study's design (StudyError when there is none of that name)."""
    try:
        with store.engine.connect() as conn:
            row = (
                conn.execute(sa.select(studies).where(studies.c.id == study_id)).mappings().first()
            )
            if row is None:
                raise StudyError(
                    f"there is no study {study_id!r} in {store.display}: check the name with the "
                    "coordinator ('napari-mammo-sae study status' lists them)"
                )
            readers = conn.execute(
                sa.select(study_readers.c.reader).where(study_readers.c.study == study_id)
            ).scalars()
            readers = tuple(sorted(readers))
            neurons = {
                int(n): s
                for n, s in conn.execute(
                    sa.select(study_neurons.c.neuron, study_neurons.c.source).where(
                        study_neurons.c.study == study_id
                    )
                )
            }
    except sa.exc.DBAPIError as exc:
        raise store._error(exc, f"cannot read study {study_id!r}") from exc
    return StudyDesign(
        row["id"], row["sae_hash"], row["concept"], int(row["seed"]), neurons, readers,
        row["coordinator"], row["created_utc"],
    )  # fmt: skip


def list_studies(store: LabelStore) -> list[str]:
    """Names of the studies in a database."""
    try:
        with store.engine.connect() as conn:
            return list(conn.execute(sa.select(studies.c.id).order_by(studies.c.id)).scalars())
    except sa.exc.DBAPIError as exc:
        raise store._error(exc, "cannot list studies") from exc


# --- the reader's side -----------------------------------------------------------------------------
class StudyReader:
    """One reader in one study: queue, progress, and verdicts through the outbox.

    ``store`` is the reader's own connection (their database role on PostgreSQL; on SQLite the
    ``reader`` name stands in for it). Raises :class:`StudyError` for an unknown study or a reader
    who is not one of its readers; :class:`DatabaseAuthError` / :class:`DatabaseUnavailableError`
    come from opening the store.
    """

    def __init__(
        self,
        store: LabelStore,
        study_id: str,
        outbox: Outbox,
        reader: str | None = None,
    ) -> None:
        self.store, self.outbox = store, outbox
        self.reader = (reader or store.user or "").strip()
        if not self.reader:
            raise StudyError("enter your reader name (on a study server it is your login)")
        self.design = open_study(store, study_id)
        if self.reader not in self.design.readers:
            raise StudyError(
                f"reader {self.reader!r} is not one of the readers of study {study_id!r}: ask the "
                "coordinator to add you, or open the study you were invited to"
            )
        self.order = self.design.order(self.reader)
        self._done: set[int] = set()
        self.last_error = ""
        self.flush()
        self._reload_done()

    @property
    def target(self) -> str:
        """The outbox key of this reader's database (path or password-free URL)."""
        return self.store.key

    def _reload_done(self) -> None:
        try:
            rows = self.store.verdicts(
                self.design.sae_hash, rater=self.reader, study=self.design.id
            )
            self._done = {v.neuron for v in rows}
        except DatabaseUnavailableError as exc:
            self.last_error = str(exc)  # keep what we knew; the outbox still counts

    def done(self) -> set[int]:
        """Neurons with a verdict of this reader: on the server or waiting in the outbox."""
        waiting = {int(r["neuron"]) for r in self.outbox.pending(self.target)
                   if r["study"] == self.design.id and r["rater"] == self.reader}  # fmt: skip
        return self._done | waiting

    def remaining(self) -> list[int]:
        """The reader's queue: neurons without a verdict yet, in their order."""
        done = self.done()
        return [n for n in self.order if n not in done]

    def progress(self) -> tuple[int, int]:
        """(neurons done, neurons in the study)."""
        return len(self.done() & set(self.order)), len(self.order)

    def waiting(self) -> int:
        """Verdicts in the outbox for this server."""
        return len(self.outbox.pending(self.target))

    def record(self, neuron: int, verdict: str, note: str = "") -> tuple[str, str]:
        """Write a verdict: ``("saved", uid)`` when the server has it, ``("queued", uid)`` if not."""
        neuron = int(neuron)
        if neuron not in self.design.neurons:
            raise StudyError(f"neuron {neuron} is not in study {self.design.id!r}")
        verdict = (verdict or "").strip().lower()
        if verdict not in VERDICTS:
            raise StudyError(f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
        row = {
            "sae_hash": self.design.sae_hash, "neuron": neuron, "verdict": verdict,
            "rater": self.reader, "note": note or "", "image_uid": "",
            "concept": self.design.concept, "uid": new_uid(), "study": self.design.id,
            "created_utc": now_utc(),
        }  # fmt: skip
        if not self.outbox.pending(self.target):
            # nothing waits: send it straight away; only if the server cannot take it now does it
            # go to the outbox ("queued"). A refusal (not your name, not in the study) is raised.
            try:
                self.store.add(**row)
            except PermissionRefusedError:
                raise
            except LabelDatabaseError as exc:  # server away, connection dropped, login lost
                self.last_error = str(exc)
                self.outbox.put(self.target, row)  # a retry later is stored once (uid)
                return "queued", row["uid"]
            self.last_error = ""
            self._done.add(neuron)
            return "saved", row["uid"]
        self.outbox.put(self.target, row)  # behind the waiting ones, to keep the order
        result = self.flush()
        if row["uid"] in result.sent:
            return "saved", row["uid"]
        refused = [why for r, why in self.outbox.refused(self.target) if r["uid"] == row["uid"]]
        if refused:
            raise LabelDatabaseError(f"the server refused the verdict (kept locally): {refused[0]}")
        return "queued", row["uid"]

    def flush(self):
        """Send what waits in the outbox (oldest first); returns the :class:`FlushResult`."""
        neuron_of = {
            r["uid"]: int(r["neuron"]) for r in self.outbox.pending(self.target)
            if r["study"] == self.design.id and r["rater"] == self.reader
        }  # fmt: skip
        result = self.outbox.flush(self.store, self.target)
        self.last_error = result.error
        self._done.update(neuron_of[u] for u in result.sent if u in neuron_of)
        return result


# --- the coordinator's side ------------------------------------------------------------------------
def latest_matrix(store: LabelStore, design: StudyDesign) -> np.ndarray:
    """readers x neurons (sorted) codes of each reader's newest neuron-level verdict (-1: none)."""
    neurons = sorted(design.neurons)
    col = {n: j for j, n in enumerate(neurons)}
    row = {r: i for i, r in enumerate(design.readers)}
    codes = np.full((len(design.readers), len(neurons)), -1, dtype=np.int64)
    code = {v: i for i, v in enumerate(VERDICTS)}
    for v in store.verdicts(design.sae_hash, study=design.id, image_uid=""):  # oldest first
        if v.rater in row and v.neuron in col:
            codes[row[v.rater], col[v.neuron]] = code[v.verdict]
    return codes


def study_agreement(
    store: LabelStore, study_id: str, *, n_bootstrap: int = 1000, seed: int = 0
) -> tuple[StudyDesign, Agreement]:
    """The study's agreement statistics with bootstrap CIs over neurons."""
    design = open_study(store, study_id)
    codes = latest_matrix(store, design)
    stats = agreement(
        codes, design.readers, sorted(design.neurons), VERDICTS, n_bootstrap=n_bootstrap,
        seed=seed,
    )  # fmt: skip
    return design, stats


def study_status(store: LabelStore, study_id: str) -> dict:
    """Per reader: neurons done of the total."""
    design = open_study(store, study_id)
    codes = latest_matrix(store, design)
    return {
        "study": design.id,
        "neurons": len(design.neurons),
        "readers": {r: int((codes[i] >= 0).sum()) for i, r in enumerate(design.readers)},
    }


class StudyConsensus:
    """What the viewer's session holds for an open study (``ReviewSession.study``).

    ``store`` is an open :class:`LabelStore` (used, not closed) or a path/URL to open per call.
    On PostgreSQL a reader's store sees only what blinding lets them see, so a reader's consensus
    covers the neurons they have rated themselves; the coordinator's covers everything.
    """

    def __init__(self, store: LabelStore | str | os.PathLike, study_id: str, sae_hash: str) -> None:
        self.store, self.id, self.sae_hash = store, study_id, sae_hash

    def consensus_spurious(self) -> list[int]:
        """Neurons the study's readers call spurious (strict majority of their verdicts)."""
        if isinstance(self.store, LabelStore):
            _design, stats = study_agreement(self.store, self.id, n_bootstrap=0)
        else:
            with LabelStore(self.store) as store:
                _design, stats = study_agreement(store, self.id, n_bootstrap=0)
        return sorted(n for n, c in stats.consensus.items() if c == "spurious")


def export_study(
    store: LabelStore, study_id: str, out_dir: str | Path, *, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Path]:
    """Write verdicts.csv (every row), consensus.csv and report.md / report.html to ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot create {out}: {exc}") from exc
    design, stats = study_agreement(store, study_id, n_bootstrap=n_bootstrap, seed=seed)
    paths = {
        "verdicts": out / f"{study_id}-verdicts.csv",
        "consensus": out / f"{study_id}-consensus.csv",
        "markdown": out / f"{study_id}-report.md",
        "html": out / f"{study_id}-report.html",
    }
    rows = store.verdicts(design.sae_hash, study=design.id)
    write_verdicts_csv(paths["verdicts"], rows)
    codes = latest_matrix(store, design)
    neurons = sorted(design.neurons)
    lines = ["neuron,source,consensus,votes,ratings," + ",".join(design.readers)]
    for j, n in enumerate(neurons):
        votes, total = stats.support[n]
        each = [VERDICTS[c] if c >= 0 else "" for c in codes[:, j]]
        lines.append(
            f"{n},{design.neurons[n]},{stats.consensus[n]},{votes},{total}," + ",".join(each)
        )
    _write(paths["consensus"], "\n".join(lines) + "\n")
    md = report_markdown(design, stats, len(rows))
    _write(paths["markdown"], md)
    _write(paths["html"], _html(md, design.id))
    return paths


def report_markdown(design: StudyDesign, stats: Agreement, n_rows: int) -> str:
    """A short Markdown report: design, progress, agreement with CIs, consensus counts."""
    pct = int(round(100 * stats.confidence))
    sources: dict[str, int] = {}
    for s in design.neurons.values():
        sources[s] = sources.get(s, 0) + 1
    cons: dict[str, int] = {}
    for c in stats.consensus.values():
        cons[c or "no verdict"] = cons.get(c or "no verdict", 0) + 1
    out = [
        f"# Reading study {design.id}",
        "",
        f"- SAE sha256 `{design.sae_hash}`, concept **{design.concept}**, seed {design.seed}",
        f"- {len(design.neurons)} neurons: "
        + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())),
        f"- {len(design.readers)} readers: {', '.join(design.readers)}; {n_rows} verdict rows "
        "(history included; each reader's newest verdict per neuron counts)",
        "",
        f"## Agreement ({pct}% bootstrap CI over neurons, {stats.n_bootstrap} resamples)",
        "",
        "| statistic | value [CI] (neurons) |",
        "|---|---|",
        f"| Fleiss' kappa | {stats.fleiss.text()} |",
        f"| Krippendorff's alpha (nominal) | {stats.krippendorff.text()} |",
    ]
    if stats.cohen is not None:
        out.append(f"| Cohen's kappa ({' vs '.join(design.readers)}) | {stats.cohen.text()} |")
    out += [
        "",
        "## Consensus (strict majority of the readers' verdicts)",
        "",
        ", ".join(f"{k}: {v}" for k, v in sorted(cons.items())),
        "",
        "Spurious by consensus: "
        + (
            ", ".join(str(n) for n, c in sorted(stats.consensus.items()) if c == "spurious")
            or "none"
        ),
        "",
    ]
    return "\n".join(out)


def _html(md: str, title: str) -> str:
    """The Markdown report as a standalone HTML page (markdown-it, with tables; no raw HTML)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px}"
        f"</style></head><body>\n{body}</body></html>\n"
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise StudyError(f"cannot write {path}: {exc}") from exc
