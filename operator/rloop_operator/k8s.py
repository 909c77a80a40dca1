"""The one module that calls the Kubernetes API (besides kopf's own watches).

Every call it makes is listed in `API_CALLS`; the Helm chart's RBAC is checked against that list.
Responses are read as plain dicts (`_preload_content=False`): the pure core works on dicts, and the
client's model classes would cost a deserialisation of every Job on every pass for nothing.
Patches are JSON merge patches, sent with that content type explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from rloop.spec import API_GROUP, API_VERSION, KIND, PLURAL

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
COMPONENT = "rloop-operator"
REQUEST_TIMEOUT = (5, 30)
"""(connect, read) seconds per call: a hung API server must not hang a worker forever."""
_RAW = {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}
"""Every call: the raw JSON response (read with `_json`), and a timeout."""
_LEASE_RAW = {"_preload_content": False, "_request_timeout": (2, 5)}
"""Lease calls: the same, with a timeout well inside any sensible renew deadline."""


@dataclass(frozen=True)
class ApiCall:
    group: str
    """API group ('' for core)."""
    resource: str
    """Plural resource name, with `/subresource` when one is used."""
    verb: str


LEASE_CALLS: tuple[ApiCall, ...] = (
    ApiCall("coordination.k8s.io", "leases", "get"),
    ApiCall("coordination.k8s.io", "leases", "create"),
    ApiCall("coordination.k8s.io", "leases", "patch"),
)
"""Leader election (leader.py), on one Lease in the operator's own namespace: the chart grants these in
a Role there (on that Lease's name where RBAC can restrict by name), never cluster-wide."""

API_CALLS: tuple[ApiCall, ...] = (
    *LEASE_CALLS,
    ApiCall(API_GROUP, PLURAL, "get"),
    ApiCall(API_GROUP, f"{PLURAL}/status", "patch"),
    ApiCall("batch", "jobs", "list"),
    ApiCall("batch", "jobs", "create"),
    ApiCall("batch", "jobs", "patch"),
    ApiCall("", "pods", "list"),
    ApiCall("", "services", "create"),
    ApiCall("", "events", "create"),
)
"""What this module calls. kopf additionally lists and watches rloopruns and jobs (see handlers.py)."""

OWNER_REFERENCE_PERMISSIONS: tuple[ApiCall, ...] = (ApiCall(API_GROUP, f"{PLURAL}/finalizers", "update"),)
"""Not calls, but checked on one: a Job we create names its run as owner with `blockOwnerDeletion: true`
(builders.py), and where the OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift
enables it) setting that needs `update` on the owner's `finalizers` subresource, or the create is
Forbidden. The operator never writes finalizers itself."""


class CreateRefused(Exception):
    """The API server refused a create with a Status: its code, reason and message (which name the
    field of an invalid object, or the quota exceeded)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @classmethod
    def from_api(cls, err: ApiException) -> CreateRefused:
        doc: Any = None
        try:
            doc = json.loads(err.body) if err.body else None
        except (TypeError, ValueError):
            doc = None
        doc = doc if isinstance(doc, dict) else {}
        message = doc.get("message") if isinstance(doc.get("message"), str) else str(err.reason or "")
        reason = doc.get("reason") if isinstance(doc.get("reason"), str) else str(err.reason or "")
        return cls(int(err.status or 0), reason, message)


class KubeApi:
    def __init__(self, api_client: client.ApiClient):
        self._custom = client.CustomObjectsApi(api_client)
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._coordination = client.CoordinationV1Api(api_client)
        self._instance = os.environ.get("HOSTNAME") or socket.gethostname()

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In-cluster service account when running in a pod, else $KUBECONFIG / ~/.kube/config."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    # ------------------------------------------------------------------------------------------ reads
    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self._custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, **_RAW
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return _json(resp)

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self._batch.list_namespaced_job(namespace, label_selector=selector, **_RAW)
        return list(_json(resp).get("items") or [])

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self._core.list_namespaced_pod(namespace, label_selector=selector, **_RAW)
        return list(_json(resp).get("items") or [])

    # ----------------------------------------------------------------------------------------- writes
    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Job, or None when a Job of that name already exists (the caller decides whether
        that one is ours: it lists the run's Jobs on its next pass). CreateRefused when the API server
        answers with a Status (invalid, forbidden, over quota, unavailable)."""
        try:
            resp = self._batch.create_namespaced_job(namespace, body, **_RAW)
        except ApiException as err:
            if err.status == 409:
                return None
            if err.status in (400, 403, 422, 429) or (err.status or 0) >= 500:
                raise CreateRefused.from_api(err) from None
            raise
        return _json(resp)

    def create_service(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Service, or None when it exists already (the run's, from an earlier attempt).
        CreateRefused as for `create_job`."""
        try:
            resp = self._core.create_namespaced_service(namespace, body, **_RAW)
        except ApiException as err:
            if err.status == 409:
                return None
            if err.status in (400, 403, 422, 429) or (err.status or 0) >= 500:
                raise CreateRefused.from_api(err) from None
            raise
        return _json(resp)

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        try:
            self._batch.patch_namespaced_job(name, namespace, patch, _content_type=MERGE_PATCH, **_RAW)
        except ApiException as err:
            if err.status != 404:  # gone meanwhile: the next pass sees that
                raise

    def patch_run_status(self, namespace: str, name: str, patch: dict[str, Any]) -> str | None:
        """Merge-patch the run's status subresource; returns the new resourceVersion (None if gone)."""
        try:
            resp = self._custom.patch_namespaced_custom_object_status(
                API_GROUP,
                API_VERSION,
                namespace,
                PLURAL,
                name,
                {"status": patch},
                _content_type=MERGE_PATCH,
                **_RAW,
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return (_json(resp).get("metadata") or {}).get("resourceVersion")

    def create_event(
        self, run: dict[str, Any], type_: str, reason: str, message: str, timestamp: str
    ) -> None:
        """A core/v1 Event about the run. Best effort: a lost event must not fail the pass."""
        meta = run.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance,
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
        }
        try:
            self._core.create_namespaced_event(namespace, body, **_RAW)
        except ApiException as err:
            log.warning(
                "could not post event %s for %s/%s: %s", reason, namespace, meta.get("name"), err.reason
            )

    # ----------------------------------------------------------------------------------------- leases
    # leader.LeaseApi. Short timeouts: a renewal that hangs must not outlive the renew deadline.
    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self._coordination.read_namespaced_lease(name, namespace, **_LEASE_RAW)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return _json(resp)

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created Lease, or None when another replica created it first."""
        try:
            resp = self._coordination.create_namespaced_lease(namespace, body, **_LEASE_RAW)
        except ApiException as err:
            if err.status == 409:
                return None
            raise
        return _json(resp)

    def patch_lease(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the Lease; None on 409 (the resourceVersion in `patch` is stale) or 404."""
        try:
            resp = self._coordination.patch_namespaced_lease(
                name, namespace, patch, _content_type=MERGE_PATCH, **_LEASE_RAW
            )
        except ApiException as err:
            if err.status in (404, 409):
                return None
            raise
        return _json(resp)


def _json(resp: Any) -> dict[str, Any]:
    doc = json.loads(resp.data)
    return doc if isinstance(doc, dict) else {}
