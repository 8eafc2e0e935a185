"""The terminal of the ``tpr`` commands (#19): registry commands never create a store, enumerated
options are choices that ``--help`` lists, ``--version``, ``-v``/``-q``, and the filter that keeps
Ray's known noise (and only it) off the driver's output. No Ray instance is started here."""

from __future__ import annotations

import enum
import io
import os
import typing
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipelines import terminal
from pipelines.cli import app
from tpr_core.authors import SOURCES
from tpr_core.data.formats import FORMATS
from tpr_core.data.store import SPLITS

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_environment():
    """The app's callback sets the verbosity variables of this process: put them back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _squash(text: str) -> str:
    return "".join(text.split())


_RUN = "0" * 32
REGISTRY_COMMANDS = {
    "search": ["search", "a woman in a red coat", "--model", "models:/nobody@champion"],
    "evaluate": ["evaluate", "--model", "models:/nobody@champion"],
    "models": ["models"],
    "models --model-name": ["models", "--model-name", "nobody"],
    "promote --dry-run": ["promote", "--dry-run", "--model-name", "nobody", "--run", _RUN],
    "promote": ["promote", "--model-name", "nobody", "--run", _RUN],
    "rollback": ["rollback", "--model-name", "nobody"],
    "index": ["index", "--model", "models:/nobody@champion", "--images", "imgs", "--out", "idx"],
}


@pytest.mark.parametrize("command", list(REGISTRY_COMMANDS))
def test_a_registry_command_in_an_empty_folder_leaves_it_empty(tmp_path, monkeypatch, command):
    """No tracking URI and no store under ./runs: exit 2 naming the store's path, nothing created
    (before #19 each started a server and left ./runs/mlflow behind)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = runner.invoke(app, REGISTRY_COMMANDS[command])
    assert res.exit_code == 2, res.output
    assert _squash(f"no MLflow store at {tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}") in _squash(res.output)
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def _choices(param: object) -> tuple[str, ...] | None:
    """The choices of a Typer option (a ``Literal`` or ``Enum`` annotation), else None."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(m.value for m in annotation)
    return None


def _choice_options(command: object, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], dict]:
    """Every (command path) -> {option flag: choices} of the app's enumerated options."""
    if hasattr(command, "commands"):
        out: dict[tuple[str, ...], dict] = {}
        for name, sub in command.commands.items():
            out.update(_choice_options(sub, (*path, name)))
        return out
    found = {p.opts[0]: _choices(p) for p in command.params if _choices(p)}
    return {path: found} if found else {}


def test_every_enumerated_option_is_a_choice_and_help_lists_it():
    options = _choice_options(typer.main.get_command(app))
    expected = {
        ("data", "prepare"): {"--format": tuple(FORMATS)},
        ("evaluate",): {"--split": SPLITS},
        ("promote",): {"--split": SPLITS, "--gallery-split": SPLITS},
        ("search",): {"--format": ("table", "json")},
        ("index",): {"--split": SPLITS},
        ("import",): {"--format": tuple(SOURCES)},
    }
    assert options == expected
    for path, flags in options.items():
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        for flag, choices in flags.items():
            assert flag in res.output and "|".join(choices) in res.output, (path, flag, res.output)


def test_an_unknown_choice_is_refused_naming_the_choices(tmp_path):
    res = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path), "--split", "valid"], env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert "'valid' is not one of" in res.output and "'train', 'val', 'test'" in res.output


def test_version_and_verbosity_flags():
    from importlib import metadata

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"tpr {metadata.version('tpr')}"
    res = runner.invoke(app, ["-v", "-q", "models"])
    assert res.exit_code == 2 and _squash("at most one of -v/--verbose and -q/--quiet") in _squash(res.output)


@pytest.mark.parametrize(
    "flag, level, progress",
    [([], terminal.NORMAL, None), (["-q"], terminal.QUIET, "0"), (["-v"], terminal.VERBOSE, None)],
)
def test_verbosity_reaches_the_environment_workers_inherit(tmp_path, monkeypatch, flag, level, progress):
    """-q/-v set TPR_VERBOSITY (Ray workers get it through pipelines.setup.worker_env), MLflow's
    URL prints are off at every level, its INFO lines off unless -v, progress off with -q."""
    monkeypatch.chdir(tmp_path)
    for key in ("TPR_PROGRESS", "MLFLOW_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(key, raising=False)
    runner.invoke(app, [*flag, "models"])
    assert terminal.verbosity() == level
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    assert os.environ.get("MLFLOW_LOGGING_LEVEL") == (None if level == terminal.VERBOSE else "WARNING")
    assert os.environ.get("TPR_PROGRESS") == progress
    from pipelines.setup import worker_env
    from tpr_core.experiment import load_config

    env = worker_env(load_config(Path(__file__).parents[2] / "pipelines/configs/irra_synthetic_tiny.yaml"))
    assert env["TPR_VERBOSITY"] == str(level) and env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    assert terminal.train_logging_config().log_level == ("INFO" if level == terminal.VERBOSE else "WARNING")


# Lines as Ray 2.60 relays them to the driver in a `tpr train` / `tpr sweep` run (#19).
NOISE_LINES = [
    "[2026-12-03 20:16:43,117 E 25742 25782] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '7b6b3c54c23d63a90257021101000000' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
    "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    "WARNING: 8 PYTHON worker processes have been started on node: 1cc0ca1a6a3fd2c0fb9cb20aa02d8f09c6e3c15445 "
    "with address: 192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be a result "
    "of using a large number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU requests.",
    "Detected that the Ray Train controller actor (9ee447b5becaa4bb40e23eb801000000) is dead. Cleaning up "
    "placement group = [PlacementGroupID(7b394db5764663ee4e741e0f824a01000000)] created by this run.",
]
KEPT_LINES = [
    "[tpr] epoch 1/3 step 4 loss 40.3145 55.7 samples/s val/R1 2.22 (best 2.22)",
    "Traceback (most recent call last):",
    "RuntimeError: CUDA out of memory",
    "[2026-12-03 20:16:43,117 E 25742 25782] core_worker.cc:1200: Actor with class name: 'RayTrainWorker' died",
    "WARNING: the object store is full",
]


def test_ray_output_filter_drops_the_known_noise_and_nothing_else(monkeypatch):
    """Through Ray's own printing function, wrapped by filter_ray_output."""
    import ray._private.worker as ray_worker

    monkeypatch.setattr(ray_worker, "print_worker_logs", ray_worker.print_worker_logs)  # undone after
    monkeypatch.setenv(terminal.VERBOSITY_ENV, "0")
    terminal.filter_ray_output()
    terminal.filter_ray_output()  # idempotent: wrapped once
    out = io.StringIO()
    data = {"lines": NOISE_LINES + KEPT_LINES, "pid": 4242, "actor_name": "RayTrainWorker", "is_err": True}
    ray_worker.print_worker_logs(data, out)
    printed = out.getvalue()
    assert all(line.split("] ")[-1][:40] not in printed for line in NOISE_LINES), printed
    assert all(line in printed for line in KEPT_LINES), printed
    assert printed.count("RayTrainWorker pid=4242") == len(KEPT_LINES)
    out = io.StringIO()
    ray_worker.print_worker_logs({**data, "lines": NOISE_LINES}, out)
    assert out.getvalue() == ""  # a batch of noise only prints nothing, not an empty prefix


def test_verbose_keeps_every_line(monkeypatch):
    import ray._private.worker as ray_worker

    original = ray_worker.print_worker_logs
    monkeypatch.setattr(ray_worker, "print_worker_logs", original)
    monkeypatch.setenv(terminal.VERBOSITY_ENV, "1")
    terminal.filter_ray_output()
    assert ray_worker.print_worker_logs is original


def test_a_worker_silences_the_report_logger_ray_train_names_after_its_file(monkeypatch):
    """Ray 2.60 logs ``Reporting training result`` per rank under a logger named by a file path,
    which Ray Train's LoggingConfig misses: the worker sets it to WARNING (INFO when verbose)."""
    import logging

    report_logger = terminal._ray_train_report_logger()
    assert report_logger is not None and report_logger.name.endswith("execution/context.py")
    monkeypatch.setattr(report_logger, "level", logging.NOTSET)
    monkeypatch.setenv(terminal.VERBOSITY_ENV, "1")
    terminal.configure_worker()
    assert report_logger.level == logging.NOTSET  # verbose: left as Ray set it
    monkeypatch.setenv(terminal.VERBOSITY_ENV, "0")
    terminal.configure_worker()
    assert report_logger.level == logging.WARNING and not report_logger.isEnabledFor(logging.INFO)
