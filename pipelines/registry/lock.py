"""The promotion lock: one promotion or rollback of a registered model at a time.

Tag writes are last-writer-wins in MLflow, so a tag "compare-and-set" needs a settle delay and
re-read and is still only probabilistic. The store does have one atomic primitive that works the
same against a remote server: creating a registered model whose name already exists fails
(unique key). Promotions and rollbacks therefore hold a lock that *is* a registered model,
``<name>.promotion-lock``, created to acquire and deleted to release; every alias read and write
happens under it. A lock older than its TTL (its creation timestamp, on the server's clock, plus
``ttl_s``) is considered abandoned by a crashed holder and is broken. While held it is visible
in the registry's model list.
"""

from __future__ import annotations

import os
import random
import time
import uuid

from pipelines.registry.common import LOCK_SUFFIX, RegistryError, has_error_code, mlflow_client


class PromotionLockTimeout(RegistryError):
    """The promotion lock stayed held by someone else for longer than the timeout."""


class PromotionLock:
    """Mutual exclusion between promotions/rollbacks of one registered model.

    Acquire = create the registered model ``<name>.promotion-lock`` (atomic: the name is a
    unique key of the store, locally or behind a server); release = delete it. A lock whose
    creation is older than ``ttl_s`` is treated as abandoned and broken.

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
        while True:
            try:
                client.create_registered_model(
                    self.lock_name,
                    tags={"tpr.lock.owner": self.owner, "tpr.lock.ttl_s": str(self.ttl_s)},
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
            holder = "unknown"
            try:
                lock = client.get_registered_model(self.lock_name)
            except MlflowException as e:
                if has_error_code(e, "RESOURCE_DOES_NOT_EXIST"):
                    continue  # released between our attempt and our look: try again now
                raise
            holder = lock.tags.get("tpr.lock.owner", "unknown")
            ttl = float(lock.tags.get("tpr.lock.ttl_s", self.ttl_s))
            age = time.time() - lock.creation_timestamp / 1000.0
            if age > ttl:
                self._break(lock.creation_timestamp)
                continue
            if time.monotonic() > deadline:
                raise PromotionLockTimeout(
                    f"registered model {self.model_name!r}: promotion lock {self.lock_name!r} held by {holder} "
                    f"for {age:.0f}s; gave up after {self.timeout_s:.0f}s"
                )
            time.sleep(self.poll_s * (0.5 + random.random()))

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
