"""Which PACS to talk to and how to log in: URL from settings or environment, secrets never stored.

The server URL, the user name and the servers whose TLS certificate is not checked live in a small
JSON file in the user config directory (``pacs.json``). Passwords and bearer tokens come only from
the environment, the system keyring (when the ``keyring`` package is installed) or a prompt; they
are held in memory, hidden from ``repr`` and never written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigError

log = logging.getLogger(__name__)

ENV_URL = "MAMMO_SAE_PACS_URL"
ENV_USER = "MAMMO_SAE_PACS_USER"
ENV_PASSWORD = "MAMMO_SAE_PACS_PASSWORD"
ENV_TOKEN = "MAMMO_SAE_PACS_TOKEN"
KEYRING_SERVICE = "napari-mammo-sae-pacs"


def settings_file() -> Path:
    """The PACS settings file (user config directory; never holds a secret)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-mammo-sae", appauthor=False)) / "pacs.json"


def origin(url: str) -> str:
    """scheme://host[:port] of a URL, without user info (what 'a named server' means here)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def safe_url(url: str) -> str:
    """The URL without user info, query or fragment: fit for logs and error messages."""
    parts = urlsplit(url)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (username + password) or bearer token; secrets are hidden from repr."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "bearer" if self.token else "basic" if self.username else "none"

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.password, self.token) if s)


@dataclass(frozen=True)
class PacsServer:
    """A DICOMweb server: its root URL (e.g. ``https://pacs/dicom-web``) and how to connect."""

    url: str
    username: str | None = None
    verify_tls: bool = True
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                "the PACS URL must look like https://host[:port]/dicom-web "
                f"(set it in the PACS dock, --url or {ENV_URL})"
            )
        if parts.username or parts.password:
            raise ConfigError(
                "put no user name or password in the PACS URL: give the user name separately and "
                f"the password in {ENV_PASSWORD}, the system keyring or at the prompt"
            )
        object.__setattr__(self, "url", self.url.rstrip("/"))

    @property
    def name(self) -> str:
        """What logs and messages call this server."""
        return safe_url(self.url)


def load_settings() -> dict:
    """The saved PACS settings ({} when none or unreadable)."""
    try:
        data = json.loads(settings_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_settings(
    url: str | None = None, username: str | None = None, insecure: bool | None = None
) -> Path:
    """Remember the URL, user name and (per server) whether TLS is verified. Never a secret."""
    data = load_settings()
    if url is not None:
        PacsServer(url)  # validate
        data["url"] = url.rstrip("/")
    if username is not None:
        data["username"] = username or None
    if insecure is not None and (url or data.get("url")):
        names = set(data.get("insecure_tls_servers") or [])
        key = origin(url or data["url"])
        names = names | {key} if insecure else names - {key}
        data["insecure_tls_servers"] = sorted(names)
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def server_from_settings(
    url: str | None = None, username: str | None = None, *, insecure: bool | None = None
) -> PacsServer:
    """The server to use: arguments first, then the environment, then the saved settings.

    TLS is verified unless ``insecure`` is True, or the saved settings list this server's origin
    in ``insecure_tls_servers``.
    """
    saved = load_settings()
    url = url or os.environ.get(ENV_URL) or saved.get("url")
    if not url:
        raise ConfigError(f"no PACS URL: give --url, set {ENV_URL}, or enter it in the PACS dock")
    username = username or os.environ.get(ENV_USER) or saved.get("username") or None
    if insecure is None:
        insecure = origin(url) in set(saved.get("insecure_tls_servers") or [])
    server = PacsServer(url, username=username, verify_tls=not insecure)
    if insecure and urlsplit(url).scheme == "https":
        log.warning(
            "TLS certificate of %s is NOT verified (turned off for this server)", server.name
        )
    return server


def resolve_credentials(
    server: PacsServer, prompt: Callable[[str], str | None] | None = None
) -> Credentials:
    """Credentials for ``server``: token or password from the environment, the keyring or ``prompt``.

    A bearer token (``MAMMO_SAE_PACS_TOKEN``) wins over basic authentication. With a user name and
    no password found, ``prompt(message)`` is asked (None: go without).
    """
    token = os.environ.get(ENV_TOKEN) or None
    if token:
        return Credentials(token=token)
    username = server.username
    if not username:
        return Credentials()
    password = os.environ.get(ENV_PASSWORD) or _keyring_password(server, username)
    if not password and prompt is not None:
        password = prompt(f"Password for {username} at {server.name}: ") or None
    return Credentials(username=username, password=password)


def _keyring_password(server: PacsServer, username: str) -> str | None:
    try:
        import keyring  # optional
    except ImportError:
        return None
    try:
        return keyring.get_password(f"{KEYRING_SERVICE}:{origin(server.url)}", username)
    except Exception as exc:  # a locked or absent backend is not an error here
        log.debug("keyring not usable: %s", type(exc).__name__)
        return None
