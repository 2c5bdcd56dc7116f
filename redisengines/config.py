"""Settings: one frozen dataclass, read from ``REDISENGINES_*`` environment variables.

Only :meth:`Settings.from_env` reads ``os.environ``; explicit arguments win over the
environment. Times are float seconds everywhere; sizes are bytes.

======================================  ===================  ==========================
variable                                field                default
======================================  ===================  ==========================
``REDISENGINES_REDIS_URL``              ``redis_url``        none (embedded server)
``REDISENGINES_CLUSTER``                ``cluster``          ``default``
``REDISENGINES_MAX_OBJECT_SIZE``        ``max_object_size``  1 GiB
``REDISENGINES_PAGE_SIZE``              ``page_size``        4 MiB
``REDISENGINES_INLINE_MAX``             ``inline_max``       256 KiB
``REDISENGINES_HEARTBEAT_INTERVAL``     ``heartbeat_interval`` 1.0 s
``REDISENGINES_HEARTBEAT_TTL``          ``heartbeat_ttl``    6.0 s
``REDISENGINES_RESULT_TTL``             ``result_ttl``       86400 s
``REDISENGINES_DONE_HISTORY``           ``done_history``     1000 commands
``REDISENGINES_MAX_QUEUE``              ``max_queue``        100000 commands per stream
``REDISENGINES_RETRIES``                ``retries``          8 (about 7 s of backoff)
``REDISENGINES_INTERRUPT_GRACE``        ``interrupt_grace``  5.0 s
``REDISENGINES_SERVER_BIN``             ``server_bin``       bundled valkey-server
``REDISENGINES_KEY``                    ``key``              none (``Cluster`` makes one)
``REDISENGINES_TLS_CA_FILE``            ``tls_ca_file``      none (the system's CAs)
``REDISENGINES_TLS_CERT_FILE``          ``tls_cert_file``    none (no client certificate)
``REDISENGINES_TLS_KEY_FILE``           ``tls_key_file``     none (the key is in the cert file)
======================================  ===================  ==========================

The ``tls_*`` files (PEM) are for ``rediss://`` URLs only: setting one with another URL is a
``ValueError``. The server's certificate is always verified, host name included.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "REDISENGINES_"
_MiB = 1 << 20


@dataclass(frozen=True)
class TLS:
    """The files of a ``rediss://`` connection (PEM paths): the CA bundle that verifies the
    server's certificate (None: the system's), and this side's certificate and key for servers
    that require one (mutual TLS; None: none, or the key is in ``cert_file``)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a client or an engine can be configured with."""

    redis_url: str | None = field(default=None, repr=False)
    cluster: str = "default"
    max_object_size: int = 1 << 30
    page_size: int = 4 * _MiB
    inline_max: int = 256 * 1024
    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 6.0
    result_ttl: float = 86400.0
    done_history: int = 1000
    max_queue: int = 100_000
    retries: int = 8
    # An interrupted command (time limit, abort) still running after this takes its engine
    # down; 0: never.
    interrupt_grace: float = 5.0
    server_bin: str | None = None
    # The cluster's signing key (hex); None: messages are neither signed nor checked.
    key: str | None = field(default=None, repr=False)
    # TLS files (PEM) for a rediss:// URL; see :class:`TLS`.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def __post_init__(self) -> None:
        if not self.cluster or any(c in self.cluster for c in "{}: \t\n"):
            raise ValueError(f"invalid cluster name {self.cluster!r}: no braces, colons or spaces")
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ValueError("heartbeat_ttl must be longer than heartbeat_interval")
        for name in ("max_object_size", "page_size", "inline_max", "done_history", "max_queue"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.interrupt_grace < 0:
            raise ValueError("interrupt_grace must be >= 0")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file (REDISENGINES_TLS_KEY_FILE) needs tls_cert_file "
                             "(REDISENGINES_TLS_CERT_FILE), the certificate it goes with")
        if self.tls is not None and self.redis_url is not None:
            check_tls_url(self.redis_url)

    @property
    def tls(self) -> TLS | None:
        """The TLS files to connect with, or None if no ``tls_*`` setting is given."""
        if not (self.tls_ca_file or self.tls_cert_file or self.tls_key_file):
            return None
        return TLS(self.tls_ca_file or None, self.tls_cert_file or None, self.tls_key_file or None)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Build settings from ``REDISENGINES_*`` variables; non-None ``overrides`` win."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default) if f.default is not None else str
            try:
                values[f.name] = kind(raw) if kind in (int, float) else raw
            except ValueError:
                raise ValueError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in another process."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[ENV_PREFIX + f.name.upper()] = str(value)
        return env

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def check_tls_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is one that TLS settings apply to (``rediss://``)."""
    if not url.startswith("rediss://"):
        scheme = url.partition("://")[0] or url
        raise ValueError(
            f"the tls_* settings (REDISENGINES_TLS_CA_FILE, _CERT_FILE, _KEY_FILE) are for a "
            f"rediss:// URL, not {scheme}://: use rediss://host:port for a TLS server, or unset "
            "them (the embedded server has no TLS)")
