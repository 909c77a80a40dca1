"""A Kubernetes API emulator for tests: PyPI `kmock==0.8`, patched, served on 127.0.0.1 in a thread.

kmock's `KubernetesEmulator` keeps objects in memory and serves list/watch/get/create/patch/delete.
As shipped (0.8) it needs fixes before kopf, the `kubernetes` client and kubectl can use it
(DESIGN §4); this module applies them:

(a) `GET /api/v1/namespaces[/<name>]`: kmock's path parser reads "namespaces" as the namespace
    prefix and answers 500; the parser is wrapped so that the Namespace resource itself parses.
(b) every write goes through one code path here that stamps `metadata.uid`, `resourceVersion`,
    `creationTimestamp` and `generation` on create (honouring `generateName`), bumps
    `resourceVersion` on every effective change and `generation` only when `spec` changes;
    no-op patches change nothing and emit no event (as a real API server does).
(c) `/api/v1` discovery says `groupVersion: "v1"` (kmock says "/v1").
(d) list responses carry `kind: <Kind>List` and `apiVersion`, and a real `metadata.resourceVersion`.
(e) `?watch=True`/`1`/`t` (any Go `ParseBool` true, as the API server accepts) is a watch, not only
    `watch=true`: kubernetes<37 Python clients send `watch=True`.

Beyond the five, because the operator's tests need them and they are cheap to emulate:
- status subresource semantics: `PATCH .../status` changes only `status`; a main-resource patch of a
  resource that has a status subresource ignores `status`; create drops `status` for such resources.
- JSON patches (`application/json-patch+json`, kopf's finalizer dance) whose `test` op fails answer
  422 (kopf retries on 422); merge patches carrying a stale `metadata.resourceVersion` answer 409;
  strategic-merge directives (`$patch`, `$setElementOrder/...`, `$retainKeys`) are dropped (lists are
  still replaced, not merged by key).
- `PUT` (replace) with optimistic concurrency; create conflicts answer 409 `AlreadyExists`;
  creating in a namespace that does not exist answers 404; unknown resources answer 404.
- label selectors (`a=b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x)`) and field selectors
  (dotted paths, `=`, `==`, `!=`) on list and watch.
- watches: no lost events between the initial snapshot and the live stream (kmock subscribes late),
  `resourceVersion=N` replays only later events from a bounded event log (410 Gone when expired),
  `timeoutSeconds` ends the stream.
- ownerReference garbage collection (background cascade; `propagationPolicy: Orphan` honoured).

Still not emulated: admission/validation/defaulting (CRD schemas are not enforced), server-side
apply, dry-run, deletecollection, RBAC, real strategic-merge list merging, pod scheduling (see
`tests.k8s.kubelet`), quota.

Usage::

    server = start()                 # or: with start() as server: ...
    server.url                       # http://127.0.0.1:<port>
    server.kubeconfig_path           # a kubeconfig for kopf/kubectl/the kubernetes client
    server.create(RLOOPRUNS, {...}, namespace='default')
    server.get(RLOOPRUNS, 'default', 'demo')
    server.stop()

Run standalone: `python -m tests.k8s.apiserver` prints the URL and the kubeconfig path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import json
import logging
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import apps, enums, parsing, rendering
from kmock._internal import dicts as kdicts

log = logging.getLogger(__name__)

# Resource keys, in kmock's notation (group/version/plural; "v1/<plural>" for the core group).
RLOOPRUNS = "rloop.dev/v1alpha1/rloopruns"
NAMESPACES = "v1/namespaces"
PODS = "v1/pods"
EVENTS = "v1/events"
SECRETS = "v1/secrets"
CONFIGMAPS = "v1/configmaps"
SERVICEACCOUNTS = "v1/serviceaccounts"
SERVICES = "v1/services"
JOBS = "batch/v1/jobs"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
LEASES = "coordination.k8s.io/v1/leases"

ALL_VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")

# kind, namespaced, subresources, short names
RESOURCES: dict[str, tuple[str, bool, tuple[str, ...], tuple[str, ...]]] = {
    RLOOPRUNS: ("RLoopRun", True, ("status",), ("rlr",)),
    NAMESPACES: ("Namespace", False, ("status",), ("ns",)),
    PODS: ("Pod", True, ("status",), ("po",)),
    EVENTS: ("Event", True, (), ("ev",)),
    SECRETS: ("Secret", True, (), ()),
    CONFIGMAPS: ("ConfigMap", True, (), ("cm",)),
    SERVICEACCOUNTS: ("ServiceAccount", True, (), ("sa",)),
    SERVICES: ("Service", True, ("status",), ("svc",)),  # stored only: no endpoints, no DNS
    JOBS: ("Job", True, ("status",), ()),
    CRDS: ("CustomResourceDefinition", False, ("status",), ("crd", "crds")),
    LEASES: ("Lease", True, (), ()),
}

REQUEST_LOG_KEEP = 1  # requests kmock keeps for its DSL (see _count_and_trim); each costs every request a scan
EVENT_LOG_SIZE = 20_000  # watch events kept for `?resourceVersion=N` replays


# --------------------------------------------------------------------------------------------------
# Fix (a): the Namespace resource's own paths.
_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    # /api/v1/namespaces, /api/v1/namespaces/<name>, /api/v1/namespaces/<name>/{status,finalize}
    if len(parts) >= 3 and parts[0] == "api" and parts[2] == "namespaces":
        rest = parts[3:]
        if len(rest) <= 1 or (len(rest) == 2 and rest[1] in ("status", "finalize")):
            return parsing.ParsedPath(
                group="",
                version=parts[1],
                plural="namespaces",
                namespace=None,
                name=rest[0] if rest else None,
                subresource=rest[1] if len(rest) == 2 else None,
            )
    return _original_parse_path(path)


_parse_path.kmock_fix = True  # type: ignore[attr-defined]
if not getattr(parsing.parse_path, "kmock_fix", False):
    parsing.parse_path = _parse_path  # kmock.rendering looks it up on the module at every request


# Fix (e): `?watch=` is a Go bool (strconv.ParseBool): "1", "t", "T", "TRUE", "true", "True" all mean
# a watch. kmock only recognises "true"; kubernetes<37 clients send `watch=True` (urlencode of a
# Python bool), which kmock then served as a plain list, so the client's watch saw no events.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_original_guess_k8s = parsing.guess_k8s


def _guess_k8s(k8s: parsing.ParsedPath, method: enums.method, query: dict[str, str]) -> enums.action | None:
    if query.get("watch") in _GO_TRUE:
        query = {**query, "watch": "true"}
    return _original_guess_k8s(k8s, method, query)


_guess_k8s.kmock_fix = True  # type: ignore[attr-defined]
if not getattr(parsing.guess_k8s, "kmock_fix", False):
    parsing.guess_k8s = _guess_k8s  # looked up on the module at every request, like parse_path


# --------------------------------------------------------------------------------------------------
# Small helpers.
def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_version(res: kmock.resource) -> str:
    return res.version if not res.group else f"{res.group}/{res.version}"


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details or {})


def _strip_smp_directives(value: Any) -> Any:
    """Drop strategic-merge-patch directives (`$patch`, `$setElementOrder/...`, `$retainKeys`)."""
    if isinstance(value, dict):
        return {k: _strip_smp_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_smp_directives(v) for v in value if not (isinstance(v, dict) and "$patch" in v)]
    return value


def _split_selector(text: str) -> list[str]:
    terms, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    return [t.strip() for t in terms if t.strip()]


def label_selector_matcher(selector: str | Mapping[str, str] | None) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over objects for a Kubernetes label selector (string form, or a dict of equalities)."""
    if not selector:
        return lambda obj: True
    if isinstance(selector, Mapping):
        want = dict(selector)
        return lambda obj: all(
            ((obj.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in want.items()
        )
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_selector(selector):
        if m := re.fullmatch(r"([^\s!=]+)\s+(in|notin)\s*\((.*)\)", term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*(\S*)", term):
            key, op, value = m.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := re.fullmatch(r"!\s*(\S+)", term):
            checks.append(lambda labels, k=m.group(1): k not in labels)
        elif m := re.fullmatch(r"(\S+)", term):
            checks.append(lambda labels, k=m.group(1): k in labels)
        else:
            raise _error(400, "BadRequest", f"unable to parse label selector term {term!r}")

    def match(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return match


def field_selector_matcher(selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    if not selector:
        return lambda obj: True
    checks: list[tuple[list[str], str, str]] = []
    for term in _split_selector(selector):
        m = re.fullmatch(r"([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)", term)
        if not m:
            raise _error(400, "BadRequest", f"unable to parse field selector term {term!r}")
        checks.append((m.group(1).split("."), m.group(2), m.group(3).strip()))

    def value_at(obj: Any, path: list[str]) -> str:
        for part in path:
            obj = obj.get(part) if isinstance(obj, Mapping) else None
        if obj is None:
            return ""
        if isinstance(obj, bool):
            return "true" if obj else "false"
        return str(obj)

    def match(obj: Mapping[str, Any]) -> bool:
        for path, op, want in checks:
            got = value_at(obj, path)
            if (got != want) if op != "!=" else (got == want):
                return False
        return True

    return match


ObjKey = tuple[kmock.resource, str | None, str]


# --------------------------------------------------------------------------------------------------
@attrs.define(kw_only=True)
class PatchedEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the fixes listed in the module docstring.

    All state changes go through `create_object`/`patch_object`/`replace_object`/`delete_object`
    (coroutines; call them on the emulator's event loop, e.g. through `Server.call`).
    kmock's DSL still works for responses (`emulator['patch', ...] << 500`), as in kmock itself:
    the state changes even when a reaction overrides the response.
    """

    _rv: int = attrs.field(default=0, init=False)
    _event_log: list[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(factory=list, init=False)
    _event_floor: int = attrs.field(default=0, init=False)  # events with rv <= floor were dropped
    listeners: list[Callable[[kmock.resource, dict[str, Any]], None]] = attrs.field(factory=list, init=False)
    served: int = attrs.field(default=0, init=False)
    # (group, version, plural) -> namespace -> keys (insertion-ordered), for lists without a full scan.
    _kind_index: dict[tuple[str, str, str], dict[str | None, dict[ObjKey, None]]] = attrs.field(
        factory=dict, init=False)
    served_watches: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Watch streams as JSON (kmock sends application/octet-stream, which client-go rejects);
        # a sub-priority above kmock's own watch fallback, still below any user-defined reaction.
        (self.fallback ** 1)[enums.action.WATCH] << kmock.headers({"Content-Type": "application/json"}) \
            << self._serve_watch

    # ------------------------------------------------------------------ state
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _info(self, res: kmock.resource) -> kmock.ResourceInfo:
        if res not in self.resources:
            raise _error(404, "NotFound", f"the server could not find the requested resource ({res.plural})")
        return self.resources[res]

    def _live(self, key: ObjKey) -> Any:
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key]
        return None

    async def _emit(self, res: kmock.resource, etype: str, raw: dict[str, Any]) -> None:
        raw = copy.deepcopy(raw)
        event = {"type": etype, "object": raw}
        rv = int(raw.get("metadata", {}).get("resourceVersion") or self._rv)
        self._event_log.append((rv, res, event))
        if len(self._event_log) > EVENT_LOG_SIZE:
            dropped = self._event_log[: len(self._event_log) - EVENT_LOG_SIZE]
            del self._event_log[: len(dropped)]
            self._event_floor = dropped[-1][0]
        await self._buses[res].put(event)
        for listener in list(self.listeners):
            try:
                listener(res, event)
            except Exception:  # a test's listener must never break the server
                log.exception("emulator listener failed")

    def _namespace_for(self, res: kmock.resource, info: kmock.ResourceInfo, url_ns: str | None,
                       body_ns: str | None) -> str | None:
        if not info.namespaced:
            return None
        ns = url_ns or body_ns
        if not ns:
            raise _error(400, "BadRequest", f"a namespace is required for {res.plural}")
        if url_ns and body_ns and url_ns != body_ns:
            raise _error(400, "BadRequest", "the namespace of the object does not match the request")
        if not self._live((kmock.resource(NAMESPACES), None, ns)):
            raise _error(404, "NotFound", f'namespaces "{ns}" not found', name=ns, kind="namespaces")
        return ns

    @staticmethod
    def _normalize(res: kmock.resource, obj: dict[str, Any]) -> None:
        """Server-side conversions: a Secret's `stringData` is folded into base64 `data`."""
        if res.group == "" and res.plural == "secrets" and obj.get("stringData"):
            data = dict(obj.get("data") or {})
            for key, value in obj.pop("stringData").items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data

    async def create_object(self, res: kmock.resource, namespace: str | None, body: Mapping[str, Any],
                            *, keep_status: bool = False) -> dict[str, Any]:
        info = self._info(res)
        if not isinstance(body, Mapping):
            raise _error(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        ns = self._namespace_for(res, info, namespace, meta.get("namespace"))
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            for _ in range(100):
                name = prefix + "".join(random.choice(alphabet) for _ in range(5))
                if not self._live((res, ns, name)):
                    break
            meta["name"] = name
        name = meta["name"]
        key = (res, ns, name)
        if self._live(key):
            raise _error(409, "AlreadyExists", f'{res.plural} "{name}" already exists',
                         name=name, group=res.group, kind=res.plural)
        if ns is not None:
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_rv()
        meta.pop("deletionTimestamp", None)
        obj.setdefault("apiVersion", _api_version(res))
        obj.setdefault("kind", info.kind)
        if "status" in info.subresources and not keep_status:
            obj.pop("status", None)
        self._normalize(res, obj)
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        self._kind_index.setdefault((res.group, res.version, res.plural), {}).setdefault(ns, {})[key] = None
        await self._emit(res, "ADDED", obj)
        return copy.deepcopy(obj)

    async def _store_change(self, res: kmock.resource, key: ObjKey, old: dict[str, Any],
                            new: dict[str, Any]) -> dict[str, Any]:
        """Bump versions, store, emit; finalize a deletion once no finalizers remain."""
        self._normalize(res, new)
        # Server-owned metadata cannot be changed by clients.
        for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
            if field in old["metadata"]:
                new.setdefault("metadata", {})[field] = old["metadata"][field]
            else:
                new.setdefault("metadata", {}).pop(field, None)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return new  # no-op: no new resourceVersion, no event (as a real API server)
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[key].history.append(new)
        await self._emit(res, "MODIFIED", new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._finalize_deletion(res, key, orphan=False)
        return copy.deepcopy(new)

    def _restrict(self, info: kmock.ResourceInfo, subresource: str | None, old: dict[str, Any],
                  patched: dict[str, Any]) -> dict[str, Any]:
        has_status = "status" in info.subresources
        if subresource == "status":
            new = copy.deepcopy(old)
            if patched.get("status") is None:
                new.pop("status", None)
            else:
                new["status"] = patched["status"]
            return new
        if subresource is None and has_status:
            new = copy.deepcopy(patched)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
            return new
        return copy.deepcopy(patched)

    def _existing(self, res: kmock.resource, namespace: str | None,
                  name: str) -> tuple[kmock.ResourceInfo, ObjKey, dict[str, Any]]:
        """(info, key, a copy of the live object) for an update; 404 when there is none."""
        info = self._info(res)
        key = (res, namespace if info.namespaced else None, name)
        obj = self._live(key)
        if obj is None:
            raise _error(404, "NotFound", f'{res.plural} "{name}" not found', name=name, kind=res.plural)
        return info, key, copy.deepcopy(obj.raw)

    @staticmethod
    def _check_version(res: kmock.resource, name: str, old: dict[str, Any], want: Any) -> None:
        """Optimistic concurrency: a write naming a stale resourceVersion answers 409."""
        if want is not None and str(want) != old["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": '
                         "the object has been modified; please apply your changes to the latest version")

    async def patch_object(self, res: kmock.resource, namespace: str | None, name: str, patch: Any, *,
                           subresource: str | None = None,
                           content_type: str = "application/merge-patch+json") -> dict[str, Any]:
        info, key, old = self._existing(res, namespace, name)
        if "apply-patch" in content_type:
            raise _error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        if isinstance(patch, list):
            try:
                patched = jsonpatch.apply_patch(old, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                raise _error(422, "Invalid", f"the JSON patch could not be applied: {e}") from None
        elif isinstance(patch, Mapping):
            if "strategic-merge" in content_type:
                patch = _strip_smp_directives(patch)
            self._check_version(res, name, old, (patch.get("metadata") or {}).get("resourceVersion"))
            patched = dict(kdicts.merge_patch_dict(old, patch))
        else:
            raise _error(400, "BadRequest", "the patch body must be a JSON object or a JSON-patch list")
        new = self._restrict(info, subresource, old, copy.deepcopy(patched))
        return await self._store_change(res, key, old, new)

    async def replace_object(self, res: kmock.resource, namespace: str | None, name: str,
                             body: Mapping[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        info, key, old = self._existing(res, namespace, name)
        body = copy.deepcopy(dict(body))
        self._check_version(res, name, old, (body.get("metadata") or {}).get("resourceVersion") or None)
        body.setdefault("apiVersion", old.get("apiVersion"))
        body.setdefault("kind", old.get("kind"))
        new = self._restrict(info, subresource, old, body)
        return await self._store_change(res, key, old, new)

    async def delete_object(self, res: kmock.resource, namespace: str | None, name: str, *,
                            propagation: str | None = None) -> dict[str, Any]:
        info = self._info(res)
        key = (res, namespace if info.namespaced else None, name)
        obj = self._live(key)
        if obj is None:
            raise _error(404, "NotFound", f'{res.plural} "{name}" not found', name=name, kind=res.plural)
        old = copy.deepcopy(obj.raw)
        meta = old["metadata"]
        if meta.get("deletionTimestamp"):
            return old
        if meta.get("finalizers"):
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = self._next_rv()
            obj.history.append(new)
            await self._emit(res, "MODIFIED", new)
            return copy.deepcopy(new)
        return await self._finalize_deletion(res, key, orphan=propagation == "Orphan")

    async def _finalize_deletion(self, res: kmock.resource, key: ObjKey, *, orphan: bool) -> dict[str, Any]:
        obj = self.objects[key]
        last = copy.deepcopy(obj.raw)
        last["metadata"]["resourceVersion"] = self._next_rv()
        obj.history[-1] = last
        obj.delete()
        await self._emit(res, "DELETED", last)
        if not orphan:
            await self._collect_garbage(last["metadata"]["uid"])
        return last

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Background cascading deletion: delete live objects owned by `owner_uid`."""
        dependents = [
            key for key, obj in list(self.objects.items())
            if not obj.deleted
            and any(ref.get("uid") == owner_uid for ref in (obj.raw.get("metadata", {}).get("ownerReferences") or []))
        ]
        for res, ns, name in dependents:
            if self._live((res, ns, name)):
                await self.delete_object(res, ns, name)

    def select(self, res: kmock.resource, namespace: str | None = None, name: str | None = None,
               label_selector: str | Mapping[str, str] | None = None,
               field_selector: str | None = None, *, copy_out: bool = True) -> list[dict[str, Any]]:
        """Live objects of `res` matching the arguments (deep copies unless `copy_out=False`: then the
        caller must not mutate them)."""
        by_labels = label_selector_matcher(label_selector)
        by_fields = field_selector_matcher(field_selector)
        if name is not None and namespace is not None or name is not None and not self._info(res).namespaced:
            obj = self._live((res, namespace if self._info(res).namespaced else None, name))
            candidates = [obj] if obj is not None else []
        else:
            by_ns = self._kind_index.get((res.group, res.version, res.plural), {})
            keys = [k for ns, ks in by_ns.items() if namespace is None or ns == namespace for k in ks]
            candidates = [obj for k in keys if (name is None or k[2] == name) and (obj := self._live(k))]
        result = []
        for obj in candidates:
            raw = obj.raw
            if by_labels(raw) and by_fields(raw):
                result.append(copy.deepcopy(raw) if copy_out else raw)
        return result

    def _KubernetesEmulator__get_objs(self, request: rendering.Request, strict: bool) -> list[Any]:
        # kmock scans every object (with a slow resource comparison) to serve one GET, create or
        # patch: a direct lookup when the request names one object, kmock's scan otherwise.
        res = request.resource
        if res is not None and request.name is not None and res in self.resources:
            key = (res, request.namespace if self.resources[res].namespaced else None, request.name)
            if key in self.objects:  # soft-deleted ones too: kmock serves their last state on DELETE
                return [self.objects[key]]
        return super()._KubernetesEmulator__get_objs(request, strict)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self._count_and_trim(request)
        res = request.resource
        if res is not None and res.plural is None and request.method == enums.method.GET:
            # Group/version discovery, also with a trailing slash (the python client asks `/api/v1/`).
            serve = self._serve_version if res.version else self._serve_group
            return aiohttp.web.json_response(await serve(request))
        if res is None or res.plural is None:
            return await apps.RawHandler._handle(self, request)  # other discovery, non-k8s paths
        content_type = request.headers.get("Content-Type", "")
        if request.method == enums.method.PUT and request.name is not None:
            async with self._lock:
                obj = await self.replace_object(res, request.namespace, request.name, request.data or {},
                                                subresource=request.subresource)
            return aiohttp.web.json_response(obj)
        async with self._lock:
            if request.action == enums.action.CREATE and request.name is None:
                obj = await self.create_object(res, request.namespace, request.data)
                # kmock's _serve_create finds the object by the name in the request body.
                request.data.setdefault("metadata", {})["name"] = obj["metadata"]["name"]
            elif request.action == enums.action.UPDATE and request.name is not None:
                await self.patch_object(res, request.namespace, request.name, request.data,
                                        subresource=request.subresource, content_type=content_type)
            elif request.action == enums.action.DELETE and request.name is not None:
                options = request.data if isinstance(request.data, Mapping) else {}
                propagation = options.get("propagationPolicy") or request.params.get("propagationPolicy")
                orphan = options.get("orphanDependents") is True
                await self.delete_object(res, request.namespace, request.name,
                                         propagation="Orphan" if orphan else propagation)
            elif request.method == enums.method.DELETE and request.name is None:
                raise _error(405, "MethodNotAllowed", "deletecollection is not emulated")
        response = await apps.RawHandler._handle(self, request)
        # A real API server answers 201 Created; kubernetes>=35 clients return None on a 200 here.
        if request.action == enums.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response

    def _count_and_trim(self, request: rendering.Request) -> None:
        """Count the request, and keep kmock's request logs short.

        kmock finds the reaction for a request by scanning every request it ever served (identity
        search in its filters, for each of its reactions), so serving gets slower with each request:
        quadratic over a long test or a benchmark. Only the request being served is kept (kmock's
        request assertions are not used with this emulator); `served` keeps the count."""
        self.served += 1
        if request.action == enums.action.WATCH:
            self.served_watches += 1
        del self._requests[:-REQUEST_LOG_KEEP]
        for payload in self._payloads:
            del payload._requests[:-REQUEST_LOG_KEEP]

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        info = self._info(request.resource)
        key = (request.resource, request.namespace if info.namespaced else None, request.name)
        async with self._lock:
            obj = self._live(key)
            if obj is None:
                raise _error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found',
                             name=request.name, kind=request.resource.plural)
            return copy.deepcopy(obj.raw)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        info = self._info(request.resource)
        async with self._lock:
            items = self.select(request.resource, request.namespace,
                                label_selector=request.params.get("labelSelector"),
                                field_selector=request.params.get("fieldSelector"))
            rv = str(self._rv)
        return {
            "apiVersion": _api_version(request.resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        assert request.resource is not None
        res = request.resource
        self._info(res)
        by_labels = label_selector_matcher(request.params.get("labelSelector"))
        by_fields = field_selector_matcher(request.params.get("fieldSelector"))

        def wanted(event: Mapping[str, Any]) -> bool:
            obj = event.get("object") or {}
            meta = obj.get("metadata") or {}
            if request.namespace is not None and meta.get("namespace") != request.namespace:
                return False
            if request.name is not None and meta.get("name") != request.name:
                return False
            return by_labels(obj) and by_fields(obj)

        timeout = request.params.get("timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout) if timeout else None
        since = request.params.get("resourceVersion") or ""

        yield b""  # send the headers now
        bus = self._buses[res]
        async with self._lock:  # subscribe and snapshot atomically: no event lost in between
            marker = await bus.mark()
            if since.isdigit() and int(since) > 0:
                if int(since) < self._event_floor:
                    initial = [{"type": "ERROR", "object": {
                        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                        "code": 410, "reason": "Expired",
                        "message": f"too old resource version: {since} ({self._event_floor})"}}]
                else:
                    initial = [copy.deepcopy(ev) for rv, r, ev in self._event_log
                               if r == res and rv > int(since) and wanted(ev)]
            else:
                initial = [{"type": "ADDED", "object": obj}
                           for obj in self.select(res, request.namespace, request.name)
                           if wanted({"object": obj})]
        try:
            for event in initial:
                yield event
            if initial and initial[0]["type"] == "ERROR":
                return
            stream = bus.stream(since=marker)
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(anext(stream), remaining)
                except (TimeoutError, StopAsyncIteration):
                    return
                if wanted(event):
                    yield event
        finally:
            await bus.unmark(marker)

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_version(request)
        assert request.resource is not None
        if not request.resource.group:
            result["groupVersion"] = request.resource.version  # fix (c): "v1", not "/v1"
        for item in result["resources"]:
            if "/" in item["name"]:  # subresources: no short names (kubectl warns about ambiguity)
                item.update(shortNames=[], categories=[], singularName="", verbs=["get", "patch", "update"])
        return result


# --------------------------------------------------------------------------------------------------
class Server:
    """The emulator served on 127.0.0.1 by a background thread with its own event loop.

    The object helpers (`create`, `get`, `list`, `patch`, `replace`, `delete`) are thread-safe and
    go through the same code as HTTP requests (versions bumped, watch events emitted), without
    counting as API requests.
    """

    def __init__(self, *, port: int = 0, resources: Mapping[str, tuple[str, bool, tuple[str, ...],
                 tuple[str, ...]]] | None = None, namespaces: Iterable[str] = ("default", "kube-system")):
        self._port = port
        self._resources = dict(RESOURCES if resources is None else resources)
        self._namespaces = list(namespaces)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.emulator: PatchedEmulator | None = None
        self.port: int | None = None
        self._tmpdir = Path(tempfile.mkdtemp(prefix="rloop-kmock-"))
        self.kubeconfig_path = self._tmpdir / "kubeconfig.yaml"

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> Server:
        self._thread = threading.Thread(target=self._run, name="kmock-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the API emulator did not start in time")
        if self._error is not None:
            raise RuntimeError("the API emulator failed to start") from self._error
        self._write_kubeconfig()
        return self

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()
        finally:
            self.loop.run_until_complete(self._cancel_leftovers())
            self.loop.close()

    @staticmethod
    async def _cancel_leftovers() -> None:
        # e.g. the watch handlers of clients still connected when the server stops
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = PatchedEmulator()
        for key, (kind, namespaced, subresources, shortnames) in self._resources.items():
            emulator.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, singular=kind.lower(), verbs=set(ALL_VERBS),
                shortnames=set(shortnames), subresources=set(subresources),
            )
        async with emulator:
            for ns in self._namespaces:
                await emulator.create_object(kmock.resource(NAMESPACES), None,
                                             {"metadata": {"name": ns}, "status": {"phase": "Active"}},
                                             keep_status=True)
            runner = aiohttp.web.ServerRunner(aiohttp.web.Server(emulator), shutdown_timeout=1.0,
                                              handle_signals=False)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, "127.0.0.1", self._port)
            await site.start()
            self.port = runner.addresses[0][1]
            self.emulator = emulator
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock-test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                       "namespace": "default"}}],
            "current-context": "kmock",
            "preferences": {},
        }
        self.kubeconfig_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML

    def env(self) -> dict[str, str]:
        """Environment for subprocesses that should talk to this server (kopf, kubectl)."""
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    def api_client(self) -> Any:
        """An official `kubernetes.client.ApiClient` configured for this server (no KUBECONFIG needed)."""
        import kubernetes

        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        configuration.api_key = {"authorization": "Bearer kmock-test-token"}
        return kubernetes.client.ApiClient(configuration)

    # ------------------------------------------------------------------ direct access
    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop (under no lock) and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _locked(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        emulator = self.emulator
        assert emulator is not None

        async def run() -> Any:
            async with emulator._lock:
                result = fn(*args, **kwargs)
                if asyncio.iscoroutine(result):
                    result = await result
                return result

        return self.call(run())

    def create(self, resource: str, body: Mapping[str, Any], namespace: str | None = None, *,
               keep_status: bool = True) -> dict[str, Any]:
        """Create an object directly (status kept by default: a controller writing its objects)."""
        assert self.emulator is not None
        ns = namespace or (body.get("metadata") or {}).get("namespace")
        return self._locked(self.emulator.create_object, kmock.resource(resource), ns, body,
                            keep_status=keep_status)

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        assert self.emulator is not None
        found = self._locked(self.emulator.select, kmock.resource(resource), namespace, name)
        return found[0] if found else None

    def list(self, resource: str, namespace: str | None = None, *,
             labels: str | Mapping[str, str] | None = None, fields: str | None = None,
             copy_out: bool = True) -> list[dict[str, Any]]:
        """Matching live objects (deep copies; with `copy_out=False` the caller must not mutate them)."""
        assert self.emulator is not None
        return self._locked(self.emulator.select, kmock.resource(resource), namespace, None, labels, fields,
                            copy_out=copy_out)

    def patch(self, resource: str, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None) -> dict[str, Any]:
        assert self.emulator is not None
        return self._locked(self.emulator.patch_object, kmock.resource(resource), namespace, name, patch,
                            subresource=subresource)

    def replace(self, resource: str, namespace: str | None, name: str, body: Mapping[str, Any], *,
                subresource: str | None = None) -> dict[str, Any]:
        assert self.emulator is not None
        return self._locked(self.emulator.replace_object, kmock.resource(resource), namespace, name, body,
                            subresource=subresource)

    def delete(self, resource: str, namespace: str | None, name: str, *,
               propagation: str | None = None) -> dict[str, Any] | None:
        """Delete an object (None if absent). Finalizers and ownerReference GC apply as via the API."""
        assert self.emulator is not None
        try:
            return self._locked(self.emulator.delete_object, kmock.resource(resource), namespace, name,
                                propagation=propagation)
        except kmock.KubernetesError as e:
            if e.status == 404:
                return None
            raise

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.create(NAMESPACES, {"metadata": {"name": name}, "status": {"phase": "Active"}})

    def create_secret(self, namespace: str, name: str, string_data: Mapping[str, str]) -> dict[str, Any]:
        data = {k: base64.b64encode(v.encode()).decode() for k, v in string_data.items()}
        return self.create(SECRETS, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                     "metadata": {"name": name, "namespace": namespace}, "data": data})

    def add_listener(self, fn: Callable[[kmock.resource, dict[str, Any]], None]) -> None:
        """Call `fn(resource, event)` on the server's loop for every watch event.

        Keep it quick and never call the blocking helpers from it (they wait on this same loop):
        e.g. set a `threading.Event` and do the work in another thread, as `Kubelet` does.
        """
        assert self.emulator is not None
        self.emulator.listeners.append(fn)

    def remove_listener(self, fn: Callable[[kmock.resource, dict[str, Any]], None]) -> None:
        if self.emulator is not None and fn in self.emulator.listeners:
            self.emulator.listeners.remove(fn)

    @property
    def request_count(self) -> int:
        """HTTP requests served so far (the direct helpers do not count)."""
        assert self.emulator is not None
        return self.emulator.served

    @property
    def watch_count(self) -> int:
        """Of those, watch requests (long-lived streams)."""
        assert self.emulator is not None
        return self.emulator.served_watches

    @property
    def resource_version(self) -> int:
        assert self.emulator is not None
        return self.emulator._rv


def start(**kwargs: Any) -> Server:
    """Start an emulator on 127.0.0.1 (a free port unless `port=` is given); `.stop()` it after."""
    return Server(**kwargs).start()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy (returned); TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def main() -> None:  # pragma: no cover - manual use
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="Serve the patched kmock Kubernetes API emulator.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    server = start(port=args.port)
    print(f"url={server.url}\nkubeconfig={server.kubeconfig_path}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.stop()


if __name__ == "__main__":
    main()

