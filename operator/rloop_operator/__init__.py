"""The RLoop operator: `kopf run -m rloop_operator` (importing the package registers the handlers).

Pure core: naming, builders, jobs, conditions, reconcile. Edges: k8s (API calls), metrics (Prometheus
and /healthz), workqueue + controller (one pass per run), handlers (kopf)."""

from rloop_operator import handlers as handlers
