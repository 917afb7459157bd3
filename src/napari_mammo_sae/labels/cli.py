"""``napari-mammo-sae study``: create a reading study, follow it, export its agreement report.

The database is ``--db`` (a ``postgresql://USER@HOST:PORT/DATABASE`` URL or an SQLite file),
else ``$NAPARI_MAMMO_SAE_DB``, else the default SQLite file. The password comes from
``$NAPARI_MAMMO_SAE_DB_PASSWORD``, ``$PGPASSWORD``, ``~/.pgpass``, or a prompt on the terminal;
never put it in the URL.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from ..errors import StudyError
from .db import URL_ENV


def _prompt(question: str) -> str | None:
    if not sys.stdin or not sys.stdin.isatty():
        return None
    return getpass.getpass(f"{question}: ")


def _open(args):
    from .store import LabelStore

    return LabelStore(args.db or os.environ.get(URL_ENV) or None, prompt=_prompt)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``study create|status|export|import|init``."""
    sub = parser.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    db_help = (
        f"postgresql://USER@HOST:PORT/DATABASE or an SQLite file (default: ${URL_ENV}, else the "
        "local label file); the password comes from the environment, ~/.pgpass or a prompt"
    )

    def common(p):
        p.add_argument("--db", default=None, metavar="URL_OR_FILE", help=db_help)

    p = sub.add_parser("create", help="create a study (coordinator)")
    common(p)
    p.add_argument("--study", required=True, help="study id (letters, digits, _ . -)")
    p.add_argument("--sae", default=None, metavar="SHA256", help="the SAE's sha256")
    p.add_argument("--sae-dir", default=None, help="or the SAE folder to hash")
    p.add_argument("--concept", required=True, help="the concept the neurons are read for")
    p.add_argument("--probe", default=None, help="probe .npz: take the top-k of each class")
    p.add_argument("--method", default="class-mean", help="probe ranking (class-mean, ...)")
    p.add_argument("--top-k", type=int, default=10, help="top neurons per class from the probe")
    p.add_argument("--controls", type=int, default=0, help="random control neurons to add")
    p.add_argument("--n-latents", type=int, default=None, help="SAE width (given a probe: its)")
    p.add_argument("--neurons", default="", help="explicit neuron ids, comma-separated")
    p.add_argument("--reader", action="append", default=[], required=True,
                   help="a reader (a PostgreSQL role name); repeat for each")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the readers' orders and controls")
    p.add_argument(
        "--set-passwords", action="store_true",
        help="ask for each reader's password on the terminal (stored on the server as a SCRAM "
        "hash); otherwise set them yourself, e.g. psql's \\password",
    )  # fmt: skip

    p = sub.add_parser("status", help="list studies, or each reader's progress in one")
    common(p)
    p.add_argument("--study", default=None)

    p = sub.add_parser("export", help="verdicts CSV, consensus CSV and a Markdown/HTML report")
    common(p)
    p.add_argument("--study", required=True)
    p.add_argument("--out", required=True, help="folder for the files")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "import",
        help="bring verdicts exported from a single-reader file into a study (coordinator)",
    )
    common(p)
    p.add_argument("--study", required=True)
    p.add_argument("csv", help="a verdict CSV (the labelling dock's 'export CSV...')")

    p = sub.add_parser("init", help="create or upgrade the database schema (coordinator)")
    common(p)


def run(args: argparse.Namespace) -> int:
    """Run one ``study`` action."""
    from . import study as st

    with _open(args) as store:
        if args.study_command == "init":
            print(f"{store.display}: schema ready")
            return 0
        if args.study_command == "create":
            return _create(args, store)
        if args.study_command == "import":
            design = st.open_study(store, args.study)
            added = store.import_csv(args.csv, study=design.id)
            print(f"imported {added} new verdicts into study {design.id}")
            return 0
        if args.study_command == "status":
            if not args.study:
                names = st.list_studies(store)
                print("\n".join(names) if names else f"no studies in {store.display}")
                return 0
            status = st.study_status(store, args.study)
            total = status["neurons"]
            print(f"study {status['study']}: {total} neurons")
            for reader, done in status["readers"].items():
                print(f"  {reader}: {done} of {total}")
            return 0
        paths = st.export_study(
            store, args.study, args.out, n_bootstrap=args.bootstrap, seed=args.seed
        )
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0


def _create(args, store) -> int:
    from . import study as st

    sae = args.sae
    top, n_latents = {}, args.n_latents
    if args.probe:
        from ..analysis.ranking import ranking_name
        from ..pipeline.probe import load_probe

        probe = load_probe(args.probe)
        method = args.method if args.method in probe.scores else ranking_name(args.method)
        if method not in probe.scores:
            raise StudyError(f"the probe has no ranking {args.method!r}: {sorted(probe.scores)}")
        top = {c: probe.top(c, method, args.top_k) for c in (1, 0)}
        n_latents = n_latents or int(probe.scores[method].shape[1])
        if sae and sae != probe.sae_sha256:
            raise StudyError("--sae and the probe's SAE differ: the probe ranks another SAE")
        sae = sae or probe.sae_sha256
    if args.sae_dir and not sae:
        from ..models.folders import sae_sha256

        sae = sae_sha256(args.sae_dir)
    if not sae:
        raise StudyError("give the SAE: --sae SHA256, --sae-dir FOLDER or --probe FILE")
    try:
        given = [int(x) for x in args.neurons.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise StudyError(f"--neurons must be comma-separated ids: {exc}") from exc
    neurons = st.choose_neurons(
        top=top, given=given, controls=args.controls, n_latents=n_latents, seed=args.seed
    )
    passwords = {}
    if args.set_passwords:
        for reader in args.reader:
            pw = _prompt(f"password for reader {reader}")
            if not pw:
                raise StudyError("--set-passwords needs a terminal to ask for the passwords")
            passwords[reader] = pw
    design = st.create_study(
        store, args.study, sae_hash=sae, concept=args.concept, neurons=neurons,
        readers=args.reader, seed=args.seed, reader_passwords=passwords,
    )  # fmt: skip
    kinds: dict[str, int] = {}
    for source in design.neurons.values():
        kinds[source] = kinds.get(source, 0) + 1
    print(
        f"study {design.id} in {store.display}: {len(design.neurons)} neurons ("
        + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        + f"), readers {', '.join(design.readers)}"
    )
    return 0
