"""What the ``tpr`` commands show on the terminal: tpr's own lines at the chosen verbosity, and the
known noise of Ray, Ray Train, Tune and MLflow kept off it.

Verbosity (``tpr -q`` / ``tpr -v``, :func:`configure`) travels in ``TPR_VERBOSITY`` to every
process a command starts (Ray workers through :func:`worker_env`):

- quiet (-1): warnings and errors, and each command's results; no progress displays.
- normal (0): also tpr's progress (epochs, a step counter within long epochs, data
  preparation, evaluation, indexing).
- verbose (1): also the libraries' own INFO lines (Ray's start-up, Ray Train's reports and
  checkpoints, MLflow's registrations) and the noise filtered below.

What is silenced, at normal and quiet, and how:

- MLflow's "View run ... at http://127.0.0.1:PORT" lines (always: the embedded server is gone
  when the command ends), its INFO log lines and registration prints, its download progress bars.
- Ray's INFO log lines on the driver (``ray.init(logging_level=...)``) and Ray Train's per-rank
  ``Reporting training result`` / ``Checkpoint successfully created`` lines (its own
  ``LoggingConfig``, applied in the controller and every worker, and the level of the one
  logger it misses); Tune's TensorBoard hint and Optuna's INFO lines; Ray's folding of similar
  lines from several processes (only rank 0 prints; the trials of a sweep stay apart).
- Lines relayed from Ray's processes that match :data:`NOISE` exactly: messages Ray prints about
  its own internals on every run, never a failure of the user's job.
- Python warnings in :data:`NOISY_WARNINGS`: deprecations inside libraries tpr calls.

Errors are never filtered: a failed worker's traceback, Ray's WARNING/ERROR lines and
MLflow's warnings all pass.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

QUIET, NORMAL, VERBOSE = -1, 0, 1
VERBOSITY_ENV = "TPR_VERBOSITY"

# Lines Ray relays from its processes to the driver that are about Ray itself, on every run.
NOISE: tuple[re.Pattern[str], ...] = (
    # Ray Train's controller starts its preemption watcher with arguments in the object store.
    re.compile(r"core_worker\.cc:\d+: Actor with class name: '\w+' and ID: '\w+' has constructor arguments "
               r"in the object store and max_restarts > 0"),
    # The raylet counts worker processes that start at once; trials of 1 CPU on a small machine do.
    re.compile(r"WARNING: \d+ \w+ worker processes have been started on node: .* maximum expected startup "
               r"concurrency"),
    # A trial that ASHA stops has its Ray Train controller killed; Ray Train then frees its workers.
    re.compile(r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group"),
)

# (message regex, category, module regex) of warnings raised inside libraries, not by tpr's use.
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # DeepSpeed's ZeRO calls the deprecated collective on every gather.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning, ""),
)

log = logging.getLogger("tpr")


def verbosity() -> int:
    """This process's verbosity (``TPR_VERBOSITY``; normal when unset or unreadable)."""
    try:
        return max(QUIET, min(VERBOSE, int(os.environ.get(VERBOSITY_ENV, "0"))))
    except ValueError:
        return NORMAL


def quiet_env(level: int | None = None) -> dict[str, str]:
    """The environment that quiets MLflow and tpr's progress in a process at ``level``
    (default :func:`verbosity`); given to the driver and to every Ray worker."""
    level = verbosity() if level is None else level
    env = {
        VERBOSITY_ENV: str(level),
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    if level < VERBOSE:
        env["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    if level <= QUIET:
        env["TPR_PROGRESS"] = "0"
    return env


def _filter_warnings() -> None:
    for message, category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _tpr_logger(level: int) -> None:
    """tpr's own log lines: plain messages on stderr (stdout keeps the results)."""
    if not any(getattr(h, "_tpr", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._tpr = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False
    log.setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}[level])


def configure(level: int = NORMAL) -> None:
    """Set this process (a ``tpr`` command) to verbosity ``level``; call before MLflow is imported.

    Variables the user set (``MLFLOW_LOGGING_LEVEL``, ...) are kept.
    """
    level = max(QUIET, min(VERBOSE, level))
    os.environ[VERBOSITY_ENV] = str(level)
    for key, value in quiet_env(level).items():
        os.environ.setdefault(key, value)
    # Only rank 0 prints, so Ray's merging of similar lines across processes would only fold
    # the trials of a sweep into "[repeated Nx across cluster]" and a hint about itself.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    _tpr_logger(level)
    if level < VERBOSE:
        _filter_warnings()
        # MLflow may already be imported (tests, the demo's second command): its level then.
        if "mlflow" in sys.modules and os.environ.get("MLFLOW_LOGGING_LEVEL") == "WARNING":
            logging.getLogger("mlflow").setLevel(logging.WARNING)


def _ray_train_report_logger() -> logging.Logger | None:
    """The logger of Ray Train's ``Reporting training result`` lines. Ray 2.60 names it after its
    file path, outside ``ray.train``, so its LoggingConfig does not reach it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: the lines show, nothing is lost
        return None
    return logging.getLogger(context.__file__)


def configure_worker() -> None:
    """The same, inside a Ray Train worker (its verbosity came in its environment)."""
    level = verbosity()
    _tpr_logger(level)
    if level < VERBOSE:
        _filter_warnings()
        report_logger = _ray_train_report_logger()
        if report_logger is not None:
            report_logger.setLevel(logging.WARNING)


def is_noise(line: str) -> bool:
    """Whether a line relayed from a Ray process is known noise (:data:`NOISE`)."""
    return any(p.search(line) for p in NOISE)


def ray_logging_level() -> int:
    """The ``ray`` logger's level for ``ray.init``: INFO only when verbose."""
    return logging.INFO if verbosity() >= VERBOSE else logging.WARNING


def train_logging_config() -> Any:
    """Ray Train's ``LoggingConfig``: its per-rank report and checkpoint lines only when verbose."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbosity() >= VERBOSE else "WARNING")


def tune_verbosity() -> int:
    """Ray Tune's ``RunConfig(verbose=...)``: its trial table at normal, results too when verbose."""
    return {QUIET: 0, NORMAL: 1, VERBOSE: 2}[verbosity()]


def quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created in memory") only when verbose."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbosity() >= VERBOSE else optuna.logging.WARNING)


def filter_ray_output() -> None:
    """Drop :data:`NOISE` lines from what Ray relays to this driver (all lines when verbose).

    Ray prints relayed lines through one function of its worker module; it is wrapped once. On a
    Ray version without it, nothing is filtered (the noise shows, nothing is lost).
    """
    if verbosity() >= VERBOSE:
        return
    try:
        import ray._private.worker as ray_worker
    except ImportError:  # pragma: no cover
        return
    original = getattr(ray_worker, "print_worker_logs", None)
    if original is None or getattr(original, "_tpr", False):
        return

    def print_worker_logs(data: dict, print_file: Any, ignore_prefix: bool = False) -> None:
        lines = [line for line in data.get("lines", []) if not is_noise(line)]
        if lines:
            original({**data, "lines": lines}, print_file, ignore_prefix)

    print_worker_logs._tpr = True  # type: ignore[attr-defined]
    ray_worker.print_worker_logs = print_worker_logs


@contextmanager
def mlflow_prints_off() -> Iterator[None]:
    """Silence MLflow's own prints (``Successfully registered model``, ``Created version``) for the
    block, unless verbose; its exceptions still propagate."""
    if verbosity() >= VERBOSE:
        yield
        return
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    was = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was
