"""Where a Redis is and how to reach it safely, read from one URL: host and port (or a unix
socket), DB, ACL user, password and TLS options. Every client we build from a URL parses it
here (FastRedis, the Cluster client; settings validates with it), so one URL means the same
to all of them; redis-py (Dramatiq's broker, the supervisor's Recovery) reads the same names
itself.

The TLS options use redis-py's query parameter names:

    rediss://app:p%40ss@redis.example:6380?ssl_ca_certs=/etc/ca.pem
        &ssl_certfile=/etc/client.pem&ssl_keyfile=/etc/client.key&ssl_cert_reqs=required

- `ssl_ca_certs`: PEM file of the CA(s) to trust instead of the system store;
- `ssl_certfile` + `ssl_keyfile`: a client certificate (mutual TLS), both or neither;
- `ssl_cert_reqs`: `required` (default) verifies the server's certificate; `none` does not
  (a test rig only: anyone in the middle can read the cache); `optional` as in redis-py;
- `ssl_check_hostname`: true/false; by default the host name is checked whenever the
  certificate is.

User and password are URL-quoted (`%40` for `@`). A TLS option on a plain redis:// URL is a
mistake, and refused, as is a file that does not exist.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, unquote, urlsplit

from engine.errors import ConfigError

_CERT_REQS: Final = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
_TRUE: Final = ("1", "true", "yes", "on", "y")
_FALSE: Final = ("0", "false", "no", "off", "n")
TLS_OPTIONS: Final = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """The TLS options of a rediss:// URL, with redis-py's names and defaults."""

    cert_reqs: str = "required"  # none | optional | required
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    check_hostname: bool | None = None  # None: check when certificates are required

    @property
    def verify(self) -> bool:
        """Whether the server's certificate is checked at all."""
        return self.cert_reqs != "none"

    @classmethod
    def parse(cls, query: dict[str, list[str]]) -> TLSOptions:
        """The options of a URL query; ConfigError on an unknown value or a missing file."""
        raw = {name: values[-1] for name, values in query.items()}
        cert_reqs = raw.get("ssl_cert_reqs", "required").strip().lower().removeprefix("cert_")
        if cert_reqs not in _CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs must be one of {'|'.join(_CERT_REQS)}")
        check: bool | None = None
        if "ssl_check_hostname" in raw:
            flag = raw["ssl_check_hostname"].strip().lower()
            if flag not in _TRUE + _FALSE:
                raise ConfigError("ssl_check_hostname must be true or false")
            check = flag in _TRUE
        files = {
            name: raw.get(f"ssl_{name}") or None for name in ("ca_certs", "certfile", "keyfile")
        }
        for name, path in files.items():
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"ssl_{name}={path} is not a readable file")
        if (files["certfile"] is None) != (files["keyfile"] is None):
            raise ConfigError("ssl_certfile and ssl_keyfile go together (a client certificate)")
        return cls(cert_reqs, files["ca_certs"], files["certfile"], files["keyfile"], check)

    def context(self) -> ssl.SSLContext:
        """A client context: the system's CAs (or `ca_certs`), our certificate if given."""
        context = ssl.create_default_context(cafile=self.ca_certs)
        mode = _CERT_REQS[self.cert_reqs]
        check = self.check_hostname if self.check_hostname is not None else mode != ssl.CERT_NONE
        context.check_hostname = check and mode != ssl.CERT_NONE
        context.verify_mode = mode
        if self.certfile is not None:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, as parsed from a redis://, rediss:// or unix:// URL."""

    host: str  # empty for a unix socket
    port: int
    path: str | None  # the unix socket
    username: str | None
    password: str | None
    db: int
    tls: bool
    tls_options: TLSOptions = TLSOptions()

    @classmethod
    def parse(cls, url: str, db: int = 0) -> RedisAddress:
        """Parse `url`; a db in the URL (`?db=` first, then the path) wins over `db`."""
        parts = urlsplit(url.strip())
        query = parse_qs(parts.query)
        raw_db = query.get("db", [None])[0]
        password = unquote(parts.password) if parts.password is not None else None
        user = unquote(parts.username) if parts.username else None
        given = [name for name in TLS_OPTIONS if name in query]
        if given and parts.scheme != "rediss":
            raise ConfigError(f"{given[0]} needs a rediss:// URL (TLS)")
        try:
            if parts.scheme == "unix" and parts.path:
                addr = cls("", 0, parts.path, user, password, db, False)
            elif parts.scheme in ("redis", "rediss"):
                raw_db = raw_db or parts.path.strip("/") or None
                host, port = parts.hostname or "127.0.0.1", parts.port or 6379
                tls = parts.scheme == "rediss"
                options = TLSOptions.parse(query) if tls else TLSOptions()
                addr = cls(host, port, None, user, password, db, tls, options)
            else:
                raise ConfigError(f"unsupported Redis URL {parts.scheme}://{parts.hostname}...")
            if raw_db is not None:
                addr = replace(addr, db=int(raw_db))
        except ValueError as exc:
            raise ConfigError(f"malformed Redis URL: {exc}") from None
        if addr.db < 0:
            raise ConfigError(f"Redis db must be >= 0, got {addr.db}")
        return addr

    def __str__(self) -> str:
        """The address without credentials (for logs and errors)."""
        scheme = "rediss" if self.tls else "redis"
        return f"unix://{self.path}" if self.path else f"{scheme}://{self.host}:{self.port}"
