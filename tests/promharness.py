"""A real Prometheus (Debian's `prometheus` package, `make prometheus`) for tests, on 127.0.0.1.

    with Prometheus.start({"rloop-stages": ["127.0.0.1:9400"]}, rule_files=[rules]) as prom:
        prom.wait_for_targets_up()
        prom.wait_for_data('rloop_runs')
        prom.query('sum by (condition) (rloop_runs)')

Targets are either `{job: ["host:port", ...]}` or a list of `ScrapeTarget` (extra target labels,
`honor_labels`, as a ServiceMonitor would set them). The server listens on 127.0.0.1 only, with its
config, TSDB and log in a temporary directory (`workdir=` keeps them somewhere of the caller's, e.g. under
pytest's `tmp_path`, so the log outlives the server). Failed waits and a server that exits early raise
with the tail of that log.

`require_prometheus()` skips a test, with the reason, when the binaries are missing: such tests are
never silently passed. Every wait is bounded.

Debian's package: /usr/bin/prometheus and /usr/bin/promtool; its own config (/etc/prometheus/prometheus.yml,
scraping :9090 and a node exporter on :9100) and TSDB (/var/lib/prometheus/metrics2) are not used here.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.s3harness import free_ports

SKIP_REASON = "Prometheus not installed: `make prometheus` installs Debian's package (needs root and apt-get)"


def find_prometheus() -> tuple[str, str] | None:
    """(prometheus, promtool) paths, or None: $RLOOP_PROMETHEUS / $RLOOP_PROMTOOL, else $PATH.

    An override that is not an executable file counts as missing (as `RLOOP_WEED` in s3harness).
    """

    def one(env: str, name: str) -> str | None:
        override = os.environ.get(env)
        if override:
            return override if os.path.isfile(override) and os.access(override, os.X_OK) else None
        return shutil.which(name)

    prom, tool = one("RLOOP_PROMETHEUS", "prometheus"), one("RLOOP_PROMTOOL", "promtool")
    return (prom, tool) if prom and tool else None


def require_prometheus() -> tuple[str, str]:
    """(prometheus, promtool), or `pytest.skip` with SKIP_REASON."""
    import pytest

    found = find_prometheus()
    if found is None:
        pytest.skip(SKIP_REASON)
    return found


def promtool_check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules PATH` (not raising on failure: look at returncode, stdout, stderr)."""
    _, tool = require_prometheus()
    return subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


class PrometheusError(RuntimeError):
    """Prometheus refused a request (its errorType and error text in the message) or exited early."""


@dataclass
class ScrapeTarget:
    job: str
    address: str
    """host:port serving /metrics."""
    labels: dict[str, str] = field(default_factory=dict)
    honor_labels: bool = False


Targets = Mapping[str, Iterable[str]] | Iterable[ScrapeTarget]


def scrape_configs(targets: Targets, scrape_interval: str) -> list[dict[str, Any]]:
    """One scrape config per job (Prometheus refuses duplicate job names), one static config per target."""
    if isinstance(targets, Mapping):
        targets = [
            ScrapeTarget(job, addr)
            for job, addrs in targets.items()
            for addr in ([addrs] if isinstance(addrs, str) else addrs)
        ]
    jobs: dict[str, dict[str, Any]] = {}
    for t in targets:
        job = jobs.setdefault(
            t.job,
            {
                "job_name": t.job,
                "honor_labels": t.honor_labels,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [],
            },
        )
        if job["honor_labels"] != t.honor_labels:
            raise ValueError(f"job {t.job!r}: targets disagree on honor_labels")
        job["static_configs"].append({"targets": [t.address], "labels": dict(t.labels)})
    return list(jobs.values())


class Prometheus:
    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, workdir: Path, log_path: Path, owns_workdir: bool
    ):
        self.proc, self.port, self.workdir, self.log_path = proc, port, workdir, log_path
        self.owns_workdir = owns_workdir

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        targets: Targets,
        *,
        rule_files: Iterable[Path] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        timeout: float = 30.0,
        workdir: Path | None = None,
    ) -> Prometheus:
        """Write the config, start the server on a free 127.0.0.1 port, wait (≤ timeout s) for /-/ready.

        Skips the calling test when Prometheus is not installed. `workdir` (created if needed) is kept on
        stop(); without it a temporary directory is used and removed on stop().
        """
        prom, _ = require_prometheus()
        owns_workdir = workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="rloop-prom-")) if workdir is None else Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "rule_files": [str(Path(p).resolve()) for p in rule_files],
            "scrape_configs": scrape_configs(targets, scrape_interval),
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
        server = cls(proc, port, workdir, log_path, owns_workdir)
        try:
            server._wait(server._ready, timeout, "Prometheus to be ready")
        except BaseException:
            server.stop()
            raise
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
        """The active scrape targets (/api/v1/targets): labels, scrapeUrl, health, lastError, ..."""
        return self._get("/api/v1/targets")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, all groups flattened (/api/v1/rules): name, query, health, type, ..."""
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
        """Poll until every active target's health is "up"; the targets."""

        def up():
            ts = self.targets()
            return ts if ts and all(t["health"] == "up" for t in ts) else None

        try:
            return self._wait(up, timeout, "every scrape target to be up")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\ntargets: {json.dumps(self.targets(), indent=1)[:2000]}") from None

    def wait_for_data(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll `query(expr)` until it returns at least one sample; those samples. A bad expression raises
        PrometheusError at once."""
        return self._wait(lambda: self.query(expr), timeout, f"data for {expr}")

    # ------------------------------------------------------------------------------------ lifecycle
    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Terminate (kill after 10 s); remove the working directory unless the caller gave it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
