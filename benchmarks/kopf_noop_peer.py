"""The benchmark's peer: a bare kopf operator watching the same resources with no-op handlers.

`kopf run benchmarks/kopf_noop_peer.py --standalone -n <ns>`: what kopf itself costs in memory for
the objects the RLoop operator watches (RLoopRuns, and Jobs selected by the same label)."""

import logging
import os

import kopf

log = logging.getLogger("noop")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.watching.label_selectors["batch", "jobs"] = os.environ["RLOOP_BENCH_SELECTOR"]
    settings.scanning.disabled = True
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)


@kopf.on.event("rloop.dev", "v1alpha1", "rloopruns")
@kopf.on.event("batch", "v1", "jobs")
def seen(name, **_):
    log.warning("noop-seen %s", name)
