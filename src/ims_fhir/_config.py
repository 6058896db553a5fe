"""Configuration of the command line: flags, then environment variables, then a TOML file.

The file (``--config``, ``IMS_FHIR_CONFIG`` or ``ims-fhir/config.toml`` in the user's config
directory) holds the same settings as the flags, by their long names with ``_`` for ``-``::

    server = "https://fhir.example.org/r4"
    namespace = "https://clinic.example.ca/fhir/sid"
    smart_client_id = "ims-clinic"
    smart_key_file = "/etc/ims-fhir/client.pem"
    smart_kid = "key-2026"
    state = "/var/lib/ims-fhir/state.sqlite3"
    batch_size = 10
    concurrency = 4
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import httpx
import platformdirs

from ._auth import BearerAuth, SmartBackendAuth
from ._exceptions import ConfigurationError

__all__ = ["SETTINGS", "auth_from", "default_config_path", "load_config"]

SETTINGS = frozenset(
    {
        "server",
        "token",
        "basic_user",
        "basic_password",
        "smart_client_id",
        "smart_key_file",
        "smart_kid",
        "smart_token_url",
        "smart_scope",
        "allow_insecure_http",
        "namespace",
        "state",
        "batch_size",
        "concurrency",
        "on_conflict",
        "timeout",
    }
)


def default_config_path() -> Path:
    """The config file read when none is named."""
    return Path(platformdirs.user_config_dir("ims-fhir")) / "config.toml"


def load_config(path: Path | None) -> dict[str, Any]:
    """Read a TOML config file; an unknown setting is an error (a typo must not pass silently)."""
    explicit = path is not None
    path = path or default_config_path()
    if not path.exists():
        if explicit:
            raise ConfigurationError(f"config file {path} does not exist")
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: {exc}") from exc
    unknown = sorted(set(data) - SETTINGS)
    if unknown:
        raise ConfigurationError(f"{path}: unknown settings {', '.join(unknown)}")
    return data


def auth_from(options: dict[str, Any]) -> httpx.Auth | None:
    """Build the client's auth from the settings: bearer, basic or SMART backend services."""
    modes = [
        name
        for name, present in (
            ("token", options.get("token")),
            ("basic", options.get("basic_user")),
            ("smart", options.get("smart_client_id")),
        )
        if present
    ]
    if len(modes) > 1:
        raise ConfigurationError(f"choose one authentication mode, not {' and '.join(modes)}")
    if options.get("token"):
        return BearerAuth(str(options["token"]))
    if options.get("basic_user"):
        return httpx.BasicAuth(str(options["basic_user"]), str(options.get("basic_password") or ""))
    if options.get("smart_client_id"):
        key_file = options.get("smart_key_file")
        kid = options.get("smart_kid")
        if not key_file or not kid:
            raise ConfigurationError("SMART backend services needs smart_key_file and smart_kid")
        extra: dict[str, Any] = {"kid": kid}
        if options.get("smart_token_url"):
            extra["token_url"] = options["smart_token_url"]
        if options.get("smart_scope"):
            extra["scope"] = options["smart_scope"]
        return SmartBackendAuth.from_key_file(str(options["smart_client_id"]), key_file, **extra)
    return None
