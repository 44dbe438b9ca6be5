"""``iort-ingest``'s configuration: one TOML file, every key checked at start.

::

    name = "central"                        # a slug: its client id, status topic, logs
    database = "/var/lib/iort-ingest/central.sqlite"
    validate = "full"                       # or "envelope" (docs/ingest.md)

    [mqtt]
    url = "mqtts://central.example.internal:8883"
    prefix = "iort"
    keepalive_s = 10
    session_expiry_s = 86400                # the broker keeps the session this long offline
    username = "iort-ingest"                # and password_file; never in the URL
    # password_file, ca_file, cert_file, key_file

    [replay]
    key_file = "/etc/iort-ingest/ingest-central.key"  # iort-audit keygen; mode 0600
    settle_s = 2.0                          # a gap is asked for once open this long
    retry_s = 5.0                           # asked again after this, doubling...
    retry_max_s = 60.0                      # ...up to this
    max_per_minute = 20                     # requests per room a minute (the room's own
                                            # limit, [mqtt] replay_max_per_minute, is 30)
    ttl_s = 120                             # how long a request stays valid

Relative paths are from the file's directory. Unknown keys are errors; an error names the
file, the key and what is expected (exit 2).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from iortd.kernel.broker import BrokerUrlError, parse_broker_url

__all__ = ["ConfigError", "IngestConfig", "MqttSettings", "ReplaySettings", "load"]

Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MqttSettings(_Model):
    url: str = "mqtt://127.0.0.1:1883"
    prefix: Slug = "iort"
    keepalive_s: int = Field(default=10, ge=1, le=3600)
    session_expiry_s: int = Field(default=86400, ge=0, le=2**32 - 1)
    username: str | None = Field(default=None, min_length=1, max_length=200)
    password_file: Path | None = Field(default=None, strict=False)
    ca_file: Path | None = Field(default=None, strict=False)
    cert_file: Path | None = Field(default=None, strict=False)
    key_file: Path | None = Field(default=None, strict=False)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parse_broker_url(url, credentials_hint="use mqtt.username and mqtt.password_file")
        return url


class ReplaySettings(_Model):
    key_file: Path = Field(strict=False)
    settle_s: float = Field(default=2.0, ge=0.0, le=3600)
    retry_s: float = Field(default=5.0, ge=0.1, le=3600)
    retry_max_s: float = Field(default=60.0, ge=0.1, le=86400)
    max_per_minute: int = Field(default=20, ge=1, le=10_000)
    ttl_s: float = Field(default=120.0, ge=1.0, le=3600)


class IngestConfig(_Model):
    name: Slug
    database: Path = Field(strict=False)
    # "full": every payload against its published schema; "envelope": the streams' bodies
    # are not walked (ingest/validate.py says what that saves and costs).
    validate_: Literal["full", "envelope"] = Field(default="full", alias="validate")
    mqtt: MqttSettings = MqttSettings()
    replay: ReplaySettings


def _resolve(base: Path, doc: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    if isinstance(out.get("database"), str):
        out["database"] = str(base / out["database"])
    for table, keys in (
        ("mqtt", ("password_file", "ca_file", "cert_file", "key_file")),
        ("replay", ("key_file",)),
    ):
        sub = out.get(table)
        if isinstance(sub, dict):
            out[table] = {
                k: str(base / v) if k in keys and isinstance(v, str) else v for k, v in sub.items()
            }
    return out


def load(path: Path) -> IngestConfig:
    try:
        doc = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return IngestConfig.model_validate(_resolve(path.parent, doc))
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{path}: {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    except BrokerUrlError as exc:  # pragma: no cover - pydantic wraps it above
        raise ConfigError(f"{path}: mqtt.url: {exc}") from None
