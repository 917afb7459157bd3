"""Hospital side: DICOMweb search/retrieve/store (``client``), the local cache, server settings."""

from __future__ import annotations

from .cache import InstanceCache, default_cache_dir
from .client import InstanceRef, PacsClient, StowResult, StudySummary
from .settings import Credentials, PacsServer, resolve_credentials, server_from_settings

__all__ = [
    "Credentials",
    "InstanceCache",
    "InstanceRef",
    "PacsClient",
    "PacsServer",
    "StowResult",
    "StudySummary",
    "default_cache_dir",
    "resolve_credentials",
    "server_from_settings",
]
