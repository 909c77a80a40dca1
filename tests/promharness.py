"""A real Prometheus (Debian's `prometheus` package, `make prometheus`) for tests, on 127.0.0.1.

    prom = Prometheus.start([ScrapeTarget("rloop-operator", "127.0.0.1:8080", labels={...},
                                          honor_labels=True)], rule_files=[rules])
    prom.wait_for_targets_up()
    prom.wait_for_data('rloop_runs')
    prom.query('sum by (condition) (rloop_runs)')
    prom.stop()

`require_prometheus()` skips a test, with the reason, when the binaries are missing: such tests are
never silently passed. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.s3harness import free_ports

SKIP_REASON = "Prometheus not installed: `make prometheus` installs Debian's package (needs root and apt-get)"


def find_prometheus() -> tuple[str, str] | None:
    """(prometheus, promtool) paths: $RLOOP_PROMETHEUS / $RLOOP_PROMTOOL, else $PATH."""
    prom = os.environ.get("RLOOP_PROMETHEUS") or shutil.which("prometheus")
    tool = os.environ.get("RLOOP_PROMTOOL") or shutil.which("promtool")
    return (prom, tool) if prom and tool else None


def require_prometheus() -> tuple[str, str]:
    import pytest

    found = find_prometheus()
    if found is None:
        pytest.skip(SKIP_REASON)
    return found


def promtool_check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    _, tool = require_prometheus()
    return subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


class PrometheusError(RuntimeError):
    pass


@dataclass
class ScrapeTarget:
    job: str
    address: str
    """host:port serving /metrics."""
    labels: dict[str, str] = field(default_factory=dict)
    honor_labels: bool = False


class Prometheus:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: Path, log_path: Path):
        self.proc, self.port, self.workdir, self.log_path = proc, port, workdir, log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        targets: Iterable[ScrapeTarget],
        *,
        rule_files: Iterable[Path] = (),
        interval: str = "1s",
        timeout: float = 30.0,
    ) -> Prometheus:
        prom, _ = require_prometheus()
        workdir = Path(tempfile.mkdtemp(prefix="rloop-prom-"))
        scrape_configs = [
            {
                "job_name": t.job,
                "honor_labels": t.honor_labels,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "static_configs": [{"targets": [t.address], "labels": dict(t.labels)}],
            }
            for t in targets
        ]
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": scrape_configs,
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_ports(1)[0]
        log_path = workdir / "prometheus.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    prom,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = cls(proc, port, workdir, log_path)
        server._wait(server._ready, timeout, "Prometheus to be ready")
        return server

    # ------------------------------------------------------------------------------------- HTTP API
    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            try:
                doc = json.loads(body)
            except ValueError:
                raise PrometheusError(f"{url}: HTTP {err.code}: {body[:500]}") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"{params.get('query', path)}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result samples (vector), or one pseudo-sample for a scalar."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self._get("/api/v1/rules")["groups"] for r in g["rules"]]

    # ---------------------------------------------------------------------------------------- waits
    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _wait(self, predicate, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}")
            time.sleep(interval)

    def wait_for_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        def up():
            ts = self.targets()
            return ts if ts and all(t["health"] == "up" for t in ts) else None

        try:
            return self._wait(up, timeout, "every scrape target to be up")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\ntargets: {json.dumps(self.targets(), indent=1)[:2000]}") from None

    def wait_for_data(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        return self._wait(lambda: self.query(expr), timeout, f"data for {expr}")

    # ------------------------------------------------------------------------------------ lifecycle
    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
