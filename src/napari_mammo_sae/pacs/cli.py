"""``napari-mammo-sae pacs search|get``: find mammography studies on a DICOMweb PACS and fetch them.

The server comes from ``--url``, ``MAMMO_SAE_PACS_URL`` or the saved settings; a password from
``MAMMO_SAE_PACS_PASSWORD``, the keyring or a prompt; a bearer token from ``MAMMO_SAE_PACS_TOKEN``.
Search lists study date, accession number, number of MG images and views - never patient names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def _server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    p.add_argument("--user", help="user name for HTTP basic authentication")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify this server's TLS certificate (only for a server you trust)",
    )
    p.add_argument("--cache", type=Path, help="instance cache folder (default: user cache)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``pacs search`` and ``pacs get``."""
    sub = parser.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)
    s = sub.add_parser("search", help="search studies with MG images (QIDO-RS)")
    _server_arguments(s)
    s.add_argument("--study", help="Study Instance UID")
    s.add_argument("--accession", help="accession number")
    s.add_argument("--from", dest="date_from", help="first study date, YYYY-MM-DD")
    s.add_argument("--to", dest="date_to", help="last study date, YYYY-MM-DD")
    s.add_argument("--limit", type=int, default=50, help="at most this many studies (50)")
    s.add_argument("--json", action="store_true", help="print a JSON list")
    g = sub.add_parser("get", help="retrieve a study's MG images (WADO-RS) into a folder")
    _server_arguments(g)
    g.add_argument("study", metavar="STUDY_UID", help="Study Instance UID")
    g.add_argument("--out", type=Path, required=True, help="folder to put the DICOM files in")


def _prompt(message: str) -> str | None:
    if not sys.stdin.isatty():
        return None
    import getpass

    return getpass.getpass(message)


def make_client(args: argparse.Namespace):
    """A PacsClient from the command line's server arguments."""
    from .client import PacsClient
    from .settings import server_from_settings

    server = server_from_settings(args.url, args.user, insecure=True if args.insecure else None)
    return PacsClient(server, cache=args.cache, prompt=_prompt)


def run(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        if args.pacs_command == "search":
            return _search(client, args)
        return _get(client, args)
    finally:
        client.close()


def _search(client, args: argparse.Namespace) -> int:
    found = client.search_studies(
        study_instance_uid=args.study,
        accession_number=args.accession,
        date_from=args.date_from,
        date_to=args.date_to,
        limit=args.limit,
    )
    rows = [
        {
            "study_instance_uid": s.study_instance_uid,
            "study_date": s.date_text,
            "accession_number": s.accession_number,
            "mg_images": s.n_images,
            "views": list(s.views),
        }
        for s in found
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no studies with MG images match")
        return 0
    print(f"{'date':10}  {'accession':16}  {'MG':>3}  {'views':24}  study UID")
    for r in rows:
        views = ", ".join(r["views"]) or "-"
        print(
            f"{r['study_date']:10}  {r['accession_number'] or '-':16}  {r['mg_images']:>3}  "
            f"{views:24}  {r['study_instance_uid']}"
        )
    return 0


def _get(client, args: argparse.Namespace) -> int:
    from ..progress import TqdmProgress

    progress = TqdmProgress(desc="retrieve")
    try:
        paths = client.retrieve_study(args.study, progress=progress)
    finally:
        progress.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        target = out / p.name
        tmp = target.with_name(f".{target.name}.part")
        try:
            os.link(p, tmp)  # same file system: no copy
        except OSError:
            shutil.copyfile(p, tmp)
        tmp.replace(target)
    print(f"{len(paths)} MG images of study {args.study} in {out}")
    return 0
