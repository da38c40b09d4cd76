"""Create a TrainJob / PyTorchJob, wait for its terminal condition, delete it when cancelled.

`TrainJobLauncher` works against `kubernetes.client.CustomObjectsApi` (or any object with the
same three methods, which is how tests script statuses without a cluster). Polling a `get`
rather than a watch stream keeps it simple and robust across API-server restarts; a training
job's lifetime makes a 15 s poll free.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from medsight.platform.secret_scan import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobKind:
    group: str
    version: str
    plural: str
    kind: str
    success: str  # condition type meaning "finished successfully"
    failure: str
    pod_label: str  # label carrying the job name on its pods (for failure logs)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


TRAINJOB = JobKind(
    "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "Complete", "Failed",
    "jobset.sigs.k8s.io/jobset-name",
)
PYTORCHJOB = JobKind(
    "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "Succeeded", "Failed",
    "training.kubeflow.org/job-name",
)


class CustomObjectsApiLike(Protocol):
    """The part of kubernetes.client.CustomObjectsApi used here (tests pass a fake)."""

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: Any, **kw: Any
    ) -> Any: ...

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kw: Any
    ) -> Any: ...

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kw: Any
    ) -> Any: ...


class TrainJobError(RuntimeError):
    pass


class TrainJobFailed(TrainJobError):
    def __init__(self, kind: str, name: str, reason: str, message: str, logs: str = "") -> None:
        self.kind, self.name, self.reason, self.message, self.logs = kind, name, reason, message, logs
        # Operator messages can quote pod output; redact like the logs.
        text = redact(f"{kind} {name} failed: {reason}: {message}")
        super().__init__(text + (f"\n--- logs of failed pods ---\n{logs}" if logs else ""))


class TrainJobTimeout(TrainJobError, TimeoutError):
    pass


class TrainJobCancelled(TrainJobError):
    pass


@dataclass(frozen=True)
class JobOutcome:
    name: str
    kind: str
    reason: str
    message: str
    elapsed_s: float


def _terminal(obj: Mapping[str, Any], kind: JobKind) -> tuple[bool, Mapping[str, Any]] | None:
    """(succeeded, condition) once a success/failure condition is True, else None."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if str(cond.get("status")) != "True":
            continue
        if cond.get("type") == kind.failure:
            return False, cond
        if cond.get("type") == kind.success:
            return True, cond
    return None


class TrainJobLauncher:
    """Create a TrainJob/PyTorchJob, wait for it, delete it when cancelled."""

    def __init__(
        self,
        api: CustomObjectsApiLike,
        namespace: str,
        *,
        kind: JobKind = TRAINJOB,
        core_api: Any | None = None,
        poll_interval_s: float = 15.0,
        max_api_errors: int = 5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api, self.namespace, self.kind, self.core_api = api, namespace, kind, core_api
        self.poll_interval_s, self.max_api_errors = poll_interval_s, max_api_errors
        self.clock, self.sleep = clock, sleep

    def _args(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def _what(self, name: str) -> str:
        return f"{self.kind.kind} {self.namespace}/{name}"

    def create(self, body: Mapping[str, Any]) -> str:
        """Create `body`; returns its name. A finished job of the same name (a KFP retry) is
        replaced; a running one is adopted, so a restarted component waits instead of failing."""
        if body.get("kind") != self.kind.kind or body.get("apiVersion") != self.kind.api_version:
            raise ValueError(
                f"body is {body.get('apiVersion')}/{body.get('kind')}, launcher expects "
                f"{self.kind.api_version}/{self.kind.kind}"
            )
        name = body["metadata"]["name"]
        try:
            self.api.create_namespaced_custom_object(*self._args(), body)
        except ApiException as exc:
            if exc.status == 409:
                existing = self.api.get_namespaced_custom_object(*self._args(), name)
                if _terminal(existing, self.kind) is None:
                    log.warning("%s already running; adopting it", self._what(name))
                    return name
                log.warning("%s exists from an earlier attempt; replacing it", self._what(name))
                self.delete(name, wait_s=600.0)
                self.api.create_namespaced_custom_object(*self._args(), body)
            elif exc.status == 403:
                raise TrainJobError(
                    f"not allowed to create {self._what(name)}: the pod's ServiceAccount needs the "
                    "medsight-job-launcher Role (manifests/base/rbac.yaml)"
                ) from exc
            elif exc.status == 404:
                raise TrainJobError(
                    f"{self.kind.api_version} {self.kind.plural} is not served by this cluster: "
                    f"install the operator or use the other job kind"
                ) from exc
            else:
                raise
        log.info("created %s", self._what(name))
        return name

    def _get(self, name: str, errors: list[int]) -> Mapping[str, Any] | None:
        """The object, or None after a transient API error (counted in `errors`)."""
        try:
            obj = self.api.get_namespaced_custom_object(*self._args(), name)
        except ApiException as exc:
            if exc.status == 404:
                raise TrainJobCancelled(f"{self._what(name)} was deleted while waiting") from exc
            if exc.status is not None and exc.status < 500 and exc.status != 429:
                raise
            errors.append(exc.status or 0)
        except (OSError, Urllib3Error):  # connection reset, API server restarting
            errors.append(0)
        else:
            errors.clear()
            return obj
        if len(errors) >= self.max_api_errors:
            raise TrainJobError(f"{self._what(name)}: {len(errors)} API errors in a row: {errors}")
        return None

    def wait(self, name: str, timeout_s: float) -> JobOutcome:
        """Poll until a Complete/Succeeded (returns) or Failed (raises TrainJobFailed) condition."""
        start = self.clock()
        deadline = start + timeout_s
        errors: list[int] = []
        last_seen: tuple[str, ...] = ()
        while True:
            obj = self._get(name, errors)
            if obj is not None:
                conds = (obj.get("status") or {}).get("conditions") or []
                seen = tuple(f"{c.get('type')}={c.get('status')}" for c in conds)
                if seen != last_seen:
                    log.info("%s conditions: %s", self._what(name), ", ".join(seen) or "none yet")
                    last_seen = seen
                state = _terminal(obj, self.kind)
                if state is not None:
                    ok, cond = state
                    reason, message = str(cond.get("reason", "")), str(cond.get("message", ""))
                    if not ok:
                        raise TrainJobFailed(self.kind.kind, name, reason, message, self.failure_logs(name))
                    return JobOutcome(name, self.kind.kind, reason, message, self.clock() - start)
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise TrainJobTimeout(f"{self._what(name)} did not finish within {timeout_s:.0f} s")
            self.sleep(min(self.poll_interval_s, remaining))

    def delete(self, name: str, wait_s: float = 0.0) -> bool:
        """Delete the job and its pods (foreground); False if it was already gone."""
        try:
            self.api.delete_namespaced_custom_object(
                *self._args(), name, propagation_policy="Foreground"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        log.info("deleted %s", self._what(name))
        deadline = self.clock() + wait_s
        while self.clock() < deadline:
            try:
                self.api.get_namespaced_custom_object(*self._args(), name)
            except ApiException as exc:
                if exc.status == 404:
                    break
                raise
            self.sleep(min(self.poll_interval_s, max(deadline - self.clock(), 0.0)))
        return True

    def failure_logs(self, name: str, tail_lines: int = 40) -> str:
        """Redacted log tails of the job's failed pods (empty without a CoreV1Api)."""
        if self.core_api is None:
            return ""
        try:
            pods = self.core_api.list_namespaced_pod(
                self.namespace, label_selector=f"{self.kind.pod_label}={name}"
            ).items
            chunks = []
            for pod in pods:
                if pod.status is not None and pod.status.phase == "Succeeded":
                    continue
                text = self.core_api.read_namespaced_pod_log(
                    pod.metadata.name, self.namespace, tail_lines=tail_lines
                )
                chunks.append(f"[{pod.metadata.name}]\n{text}")
            return redact("\n".join(chunks))
        except (ApiException, OSError) as exc:  # logs are a courtesy; the reason is reported anyway
            return f"(could not read pod logs: {exc})"

    def run(self, body: Mapping[str, Any], timeout_s: float, *, handle_sigterm: bool = True) -> JobOutcome:
        """create + wait. On timeout, cancellation (SIGTERM from KFP, Ctrl-C) the job is deleted
        so no GPU node keeps training for a run nobody waits on; failed jobs are kept for logs."""
        name = self.create(body)
        try:
            with _sigterm_raises(enabled=handle_sigterm):
                return self.wait(name, timeout_s)
        except (TrainJobTimeout, TrainJobCancelled, KeyboardInterrupt):
            self.delete(name)
            raise


@contextmanager
def _sigterm_raises(enabled: bool) -> Iterator[None]:
    """Turn SIGTERM (how KFP/Kubernetes stops a pod) into TrainJobCancelled while waiting."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum: int, frame: Any) -> None:
        raise TrainJobCancelled(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
