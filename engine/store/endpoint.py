"""Where a Redis is and how to reach it safely: host, port, ACL user, password and TLS options,
read from one redis:// or rediss:// URL.

The TLS options use redis-py's query parameter names, so that one URL configures every client
we use alike (redis-py in Dramatiq's broker and the supervisor's Recovery reads them itself;
the cluster client reads them here):

    rediss://app:p%40ss@redis.example:6380?ssl_ca_certs=/etc/ca.pem
        &ssl_certfile=/etc/client.pem&ssl_keyfile=/etc/client.key&ssl_cert_reqs=required

- `ssl_ca_certs`: PEM file of the CA(s) to trust instead of the system store;
- `ssl_certfile` + `ssl_keyfile`: a client certificate (mutual TLS), both or neither;
- `ssl_cert_reqs`: `required` (default) verifies the server's certificate; `none` does not
  (a test rig only: anyone in the middle can read the cache). `optional` counts as required.

User and password are URL-quoted (`%40` for `@`). A TLS option on a plain redis:// URL is a
mistake, and refused, as is a file that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from engine.errors import ConfigError

_CERT_REQS = ("none", "optional", "required")
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A Redis server (or a Cluster's seed node) and the credentials and TLS to reach it."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Parse a redis:// or rediss:// URL; ConfigError naming what is wrong."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(f"expected a redis:// or rediss:// URL, got {parts.scheme}://")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ConfigError("the Redis URL's port is not a number") from None
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        tls = parts.scheme == "rediss"
        given = [name for name in TLS_OPTIONS if name in query]
        if given and not tls:
            raise ConfigError(f"{given[0]} needs a rediss:// URL (TLS)")
        reqs = query.get("ssl_cert_reqs", "required").strip().lower()
        if reqs not in _CERT_REQS:
            raise ConfigError(f"ssl_cert_reqs must be one of {'|'.join(_CERT_REQS)}")
        files = {name: query.get(name) or None for name in TLS_OPTIONS[:3]}
        for name, path in files.items():
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}={path} is not a readable file")
        if (files["ssl_certfile"] is None) != (files["ssl_keyfile"] is None):
            raise ConfigError("ssl_certfile and ssl_keyfile go together (a client certificate)")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=tls,
            ca_certs=files["ssl_ca_certs"],
            certfile=files["ssl_certfile"],
            keyfile=files["ssl_keyfile"],
            verify=reqs != "none",
        )

    def __str__(self) -> str:
        """The address without credentials (for logs and errors)."""
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"
