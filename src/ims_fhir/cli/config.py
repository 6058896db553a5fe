"""Configuration of the command line: flags, then environment variables, then a TOML file.

The file (``--config``, ``IMS_FHIR_CONFIG`` or ``ims-fhir/config.toml`` in the user's config
directory) holds the same settings as the flags, by their long names with ``_`` for ``-``::

    server = "https://fhir.example.org/r4"
    namespace = "https://clinic.example.ca/fhir/sid"
    smart_client_id = "ims-clinic"
    smart_key_file = "/etc/ims-fhir/client.pem"
    smart_kid = "key-2026"
    ca_bundle = "/etc/ims-fhir/regional-ca.pem"
    header = ["X-Api-Key: ..."]
    state = "/var/lib/ims-fhir/state.sqlite3"
    batch_size = 10
    concurrency = 4

Each command takes only the settings it has a flag for: ``server`` is where ``push``, ``pull``
and ``check`` go, and never makes the offline ``validate`` talk to a server (its server is
``validate_server``).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import platformdirs

from .._exceptions import ConfigurationError
from ..client.auth import BearerAuth, ClientCredentialsAuth, SmartBackendAuth

__all__ = ["SETTINGS", "Setting", "auth_from", "default_config_path", "load_config", "where_to_set"]


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its flag, its environment variable (if any) and its config key."""

    key: str
    env: str | None = None
    option: str | None = None  # the flag, when it is not the key's

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return self.option or "--" + self.key.replace("_", "-")


SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in [
        Setting("server", "IMS_FHIR_SERVER"),
        Setting("validate_server", "IMS_FHIR_VALIDATE_SERVER", option="--server"),
        Setting("token", "IMS_FHIR_TOKEN"),
        Setting("basic_user", "IMS_FHIR_BASIC_USER"),
        Setting("basic_password", "IMS_FHIR_BASIC_PASSWORD"),
        Setting("smart_client_id", "IMS_FHIR_SMART_CLIENT_ID"),
        Setting("smart_key_file", "IMS_FHIR_SMART_KEY_FILE"),
        Setting("smart_kid", "IMS_FHIR_SMART_KID"),
        Setting("smart_token_url", "IMS_FHIR_SMART_TOKEN_URL"),
        Setting("smart_scope", "IMS_FHIR_SMART_SCOPE"),
        Setting("oauth_client_id", "IMS_FHIR_OAUTH_CLIENT_ID"),
        Setting("oauth_client_secret", "IMS_FHIR_OAUTH_CLIENT_SECRET"),
        Setting("oauth_token_url", "IMS_FHIR_OAUTH_TOKEN_URL"),
        Setting("oauth_scope", "IMS_FHIR_OAUTH_SCOPE"),
        Setting("ca_bundle", "IMS_FHIR_CA_BUNDLE"),
        Setting("header", "IMS_FHIR_HEADER"),
        Setting("allow_insecure_http", "IMS_FHIR_ALLOW_INSECURE_HTTP"),
        Setting("timeout", "IMS_FHIR_TIMEOUT"),
        Setting("namespace", "IMS_FHIR_NAMESPACE"),
        Setting("allow_default_namespace", "IMS_FHIR_ALLOW_DEFAULT_NAMESPACE"),
        Setting("state", "IMS_FHIR_STATE"),
        Setting("batch_size"),
        Setting("concurrency"),
        Setting("on_conflict"),
        Setting("match", "IMS_FHIR_MATCH"),
        Setting("match_threshold", "IMS_FHIR_MATCH_THRESHOLD"),
        Setting("create_patients", "IMS_FHIR_CREATE_PATIENTS"),
    ]
}


def where_to_set(key: str) -> str:
    """Where a user sets ``key``: ``--server, IMS_FHIR_SERVER or server in the config file``."""
    setting = SETTINGS[key]
    env = f", {setting.env}" if setting.env else ""
    return f"{setting.flag}{env} or `{key}` in the config file"


def default_config_path() -> Path:
    """The config file read when none is named."""
    return Path(platformdirs.user_config_dir("ims-fhir")) / "config.toml"


def load_config(path: Path | None) -> dict[str, Any]:
    """Read a TOML config file; an unknown setting is an error (a typo must not pass silently)."""
    explicit = path is not None
    path = path or default_config_path()
    if not path.exists():
        if explicit:
            raise ConfigurationError(
                f"config file {path} does not exist",
                fix="pass an existing file to --config (or IMS_FHIR_CONFIG)",
            )
        return {}
    if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ConfigurationError(
            f"config file {path} is not a regular file of at most {_MAX_CONFIG_BYTES} bytes",
            fix="pass a TOML file to --config (or IMS_FHIR_CONFIG)",
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"config file {path}: {exc}", fix="fix the TOML") from exc
    except OSError as exc:
        raise ConfigurationError(
            f"config file {path}: {exc.strerror}", fix="pass another --config"
        ) from exc
    if isinstance(data.get("header"), str):
        data["header"] = [data["header"]]  # one header, written without the list
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ConfigurationError(
            f"config file {path}: unknown settings {', '.join(unknown)}",
            fix=f"the settings are {', '.join(SETTINGS)}",
        )
    for key, value in data.items():
        _check_type(path, key, value)
    return data


_MAX_CONFIG_BYTES = 1024 * 1024
_NUMBERS = {"timeout"}
_INTEGERS = {"batch_size", "concurrency"}
_BOOLEANS = {"allow_insecure_http", "allow_default_namespace"}
_LISTS = {"header"}


def _check_type(path: Path, key: str, value: Any) -> None:
    """A value of the kind the setting takes (TOML has dates, tables and arrays too)."""
    if key in _BOOLEANS:
        ok, kind = isinstance(value, bool), "true or false"
    elif key in _INTEGERS:
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif key in _NUMBERS:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and value > 0
        kind = "a number of seconds above 0"
    elif key in _LISTS:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        kind = "a list of strings"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise ConfigurationError(
            f"config file {path}: {key} = {value!r:.60} is not {kind}",
            setting=key,
            fix="fix the value",
        )


def auth_from(options: dict[str, Any]) -> httpx.Auth | None:
    """Build the client's auth from the settings: bearer, basic, SMART or OAuth client secret."""
    modes = [
        name
        for name, present in (
            ("token", options.get("token")),
            ("basic_user", options.get("basic_user")),
            ("smart_client_id", options.get("smart_client_id")),
            ("oauth_client_id", options.get("oauth_client_id")),
        )
        if present
    ]
    if len(modes) > 1:
        raise ConfigurationError(
            f"two authentication modes given: {' and '.join(modes)}",
            setting=modes[1],
            fix="choose one",
        )
    if options.get("token"):
        return BearerAuth(str(options["token"]))
    if options.get("basic_user"):
        return httpx.BasicAuth(str(options["basic_user"]), str(options.get("basic_password") or ""))
    if options.get("smart_client_id"):
        for needed in ("smart_key_file", "smart_kid"):
            if not options.get(needed):
                raise ConfigurationError(
                    f"SMART backend services needs {needed} too", setting=needed
                )
        key_file = Path(str(options["smart_key_file"]))
        if not key_file.is_file():
            raise ConfigurationError(
                f"SMART private key {key_file} is not a file", setting="smart_key_file"
            )
        try:
            return SmartBackendAuth.from_key_file(
                str(options["smart_client_id"]),
                key_file,
                kid=str(options["smart_kid"]),
                token_url=options.get("smart_token_url") or None,
                scope=options.get("smart_scope") or "system/*.read system/*.write",
            )
        except (ValueError, OSError) as exc:
            raise ConfigurationError(
                f"SMART private key {key_file} cannot be read as an RSA or EC private key (PEM)",
                setting="smart_key_file",
            ) from exc
    if options.get("oauth_client_id"):
        if not options.get("oauth_client_secret"):
            raise ConfigurationError(
                "OAuth client credentials need oauth_client_secret too",
                setting="oauth_client_secret",
            )
        return ClientCredentialsAuth(
            str(options["oauth_client_id"]),
            str(options["oauth_client_secret"]),
            token_url=options.get("oauth_token_url") or None,
            scope=options.get("oauth_scope") or None,
        )
    return None
