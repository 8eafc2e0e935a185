"""The promotion lock: one promotion or rollback of a registered model at a time.

Tag writes are last-writer-wins in MLflow, so a tag "compare-and-set" needs a settle delay and
re-read and is still only probabilistic. The store does have one atomic primitive that works the
same against a remote server: creating a registered model whose name already exists fails
(unique key). Promotions and rollbacks therefore hold a lock that *is* a registered model,
``<name>.promotion-lock``, created to acquire and deleted to release; every alias read and write
happens under it. While held it is visible in the registry's model list, with its owner's host,
pid and start time as tags.

A held lock is broken when its owner is provably gone: a process on this host that no longer
exists, or a lock this waiter has seen held for longer than its TTL (measured on the waiter's
own monotonic clock, so that no two machines' clocks are compared). ``break_lock`` (``tpr
promote --break-lock``) removes one by hand.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
import uuid
from typing import Any

from pipelines.registry.common import LOCK_SUFFIX, RegistryError, has_error_code, mlflow_client


class PromotionLockTimeout(RegistryError):
    """The promotion lock stayed held by someone else for longer than the timeout."""


class PromotionLock:
    """Mutual exclusion between promotions/rollbacks of one registered model.

    Acquire = create the registered model ``<name>.promotion-lock`` (atomic: the name is a
    unique key of the store, locally or behind a server); release = delete it. A lock whose
    owner has exited on this host, or that this waiter has seen held for over ``ttl_s``, is
    treated as abandoned and broken.

    Args:
        model_name: the registered model being changed.
        ttl_s: age after which a held lock is considered abandoned.
        timeout_s: how long to wait for the lock.
        poll_s: mean wait between attempts (jittered).
    """

    def __init__(
        self, model_name: str, ttl_s: float = 1800.0, timeout_s: float = 3600.0, poll_s: float = 0.5
    ):
        self.model_name = model_name
        self.lock_name = f"{model_name}{LOCK_SUFFIX}"
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.held = False

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        client = mlflow_client()
        deadline = time.monotonic() + self.timeout_s
        first_seen: dict[int, float] = {}  # lock creation timestamp -> when this waiter first saw it
        while True:
            try:
                client.create_registered_model(
                    self.lock_name,
                    tags=self._owner_tags(),
                    description=f"Promotion lock of registered model {self.model_name!r}; held by {self.owner}.",
                )
                self.held = True
                return
            except MlflowException as e:
                if has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
                    # The create lost to a holder that released before the store could describe
                    # it (the store's conflict path re-reads the existing model): retry now.
                    continue
                if not has_error_code(e, "RESOURCE_ALREADY_EXISTS"):
                    raise
            try:
                lock = client.get_registered_model(self.lock_name)
            except MlflowException as e:
                if has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
                    continue  # released between our attempt and our look: try again now
                raise
            if self._abandoned(lock, first_seen):
                self._break(lock.creation_timestamp)
                continue
            if time.monotonic() > deadline:
                raise PromotionLockTimeout(
                    f"registered model {self.model_name!r}: promotion lock {self.lock_name!r} held by "
                    f"{describe_holder(lock.tags)}; gave up after {self.timeout_s:.0f}s "
                    f"(tpr promote --break-lock removes it if its owner is gone)"
                )
            time.sleep(self.poll_s * (0.5 + random.random()))

    def _owner_tags(self) -> dict[str, str]:
        return {
            "tpr.lock.owner": self.owner,
            "tpr.lock.host": socket.gethostname(),
            "tpr.lock.pid": str(os.getpid()),
            "tpr.lock.started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tpr.lock.ttl_s": str(self.ttl_s),
        }

    def _abandoned(self, lock: Any, first_seen: dict[int, float]) -> bool:
        """Whether the held ``lock`` is provably abandoned; says once who holds it otherwise."""
        tags = lock.tags
        if tags.get("tpr.lock.host") == socket.gethostname() and not _alive(tags.get("tpr.lock.pid", "")):
            print(f"[tpr] breaking the promotion lock of {self.model_name!r}: its owner "
                  f"{describe_holder(tags)} has exited", file=sys.stderr)  # fmt: skip
            return True
        if lock.creation_timestamp not in first_seen:
            first_seen[lock.creation_timestamp] = time.monotonic()
            print(f"[tpr] waiting for the promotion lock of {self.model_name!r}, held by {describe_holder(tags)}",
                  file=sys.stderr)  # fmt: skip
        ttl = float(tags.get("tpr.lock.ttl_s", self.ttl_s))
        return time.monotonic() - first_seen[lock.creation_timestamp] > ttl

    def _break(self, created_ms: int) -> None:
        """Delete an abandoned lock, unless it was replaced meanwhile (same creation time)."""
        from mlflow.exceptions import MlflowException

        client = mlflow_client()
        try:
            if client.get_registered_model(self.lock_name).creation_timestamp == created_ms:
                client.delete_registered_model(self.lock_name)
        except MlflowException as e:
            if not has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
                raise

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        if not self.held:
            return
        client = mlflow_client()
        try:
            lock = client.get_registered_model(self.lock_name)
            if lock.tags.get("tpr.lock.owner") == self.owner:
                client.delete_registered_model(self.lock_name)
        except MlflowException as e:
            if not has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
                raise
        finally:
            self.held = False

    def __enter__(self) -> PromotionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(tags: dict[str, str]) -> str:
    """Who holds a lock and since when, from its tags."""
    host, pid = tags.get("tpr.lock.host"), tags.get("tpr.lock.pid")
    who = f"pid {pid} on {host}" if host and pid else tags.get("tpr.lock.owner", "unknown")
    since = tags.get("tpr.lock.started")
    return f"{who} since {since}" if since else who


def _alive(pid: str) -> bool:
    """Whether process ``pid`` exists on this host (True when it cannot be told)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError, OverflowError):
        return True
    return True


def break_lock(model_name: str) -> str | None:
    """Remove the promotion lock of ``model_name`` whoever holds it; returns who held it (None
    when there was none). For a lock whose owner is gone on another host."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        lock = client.get_registered_model(f"{model_name}{LOCK_SUFFIX}")
        client.delete_registered_model(lock.name)
    except MlflowException as e:
        if has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise
    return describe_holder(lock.tags)
