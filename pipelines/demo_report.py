"""The demo's closing table and verdict: the baseline, every sweep trial and the champion,
all read back from MLflow, compared only when they had the same training budget.

Everything here comes from the MLflow runs themselves (params and metric histories), not
from the sweep's return value, so the table shows what was logged: a row's budget is its
run's ``train.epochs``, ``train.max_steps_per_epoch``, ``data.batch_size``,
``distributed.num_workers`` and ``distributed.grad_accum``; its epochs reached follow from
the step of its last validation; it finished when it logged test metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from rich import box
from rich.table import Table

GATE_METRIC = "R1"
_SHORT = {"mlm_mask_ratio": "mask"}  # column headers of searched keys: their last dotted part


class Budget(NamedTuple):
    """What one training run was allowed to train: the comparison is fair only when equal."""

    epochs: int
    steps_per_epoch: int | None  # None: every batch of the epoch (no cap logged)
    batch: int
    workers: int
    grad_accum: int

    def describe(self) -> str:
        steps = "all" if self.steps_per_epoch is None else str(self.steps_per_epoch)
        accum = f", grad_accum {self.grad_accum}" if self.grad_accum != 1 else ""
        return f"{self.epochs} epochs x {steps} steps x batch {self.batch} on {self.workers} workers{accum}"


@dataclass
class Row:
    """One line of the table: a training run as MLflow recorded it.

    Attributes:
        label: what the row is (``baseline``, ``trial 2``, ``champion v3 = trial 2``).
        run_id: its MLflow run.
        budget: its training budget, from the run's params.
        epochs_done: epochs it trained (fewer than ``budget.epochs`` when stopped).
        status: ``done``, ``stopped`` (by ASHA) or ``failed``.
        val_r1: its best validation R@1 (what the sweep and the gate select on).
        test: its test metrics (a finished run only).
        searched: the searched keys' values in this run.
    """

    label: str
    run_id: str
    budget: Budget
    epochs_done: int | None
    status: str
    val_r1: float | None
    test: dict[str, float] = field(default_factory=dict)
    searched: dict[str, float] = field(default_factory=dict)

    def epochs_cell(self) -> str:
        done = "?" if self.epochs_done is None else str(self.epochs_done)
        cell = f"{done}/{self.budget.epochs}"
        return cell if self.status == "done" else f"{cell} {self.status}"


class UnequalBudgets(ValueError):
    """Rows that trained under different budgets: their metrics must not share one table."""


def _opt_int(value: str | None) -> int | None:
    return None if value in (None, "", "None") else int(float(value))


def _budget_of(params: dict[str, str], run_id: str) -> Budget:
    try:
        return Budget(
            epochs=int(params["train.epochs"]),
            steps_per_epoch=_opt_int(params.get("train.max_steps_per_epoch")),
            batch=int(params["data.batch_size"]),
            workers=int(params["distributed.num_workers"]),
            grad_accum=int(params.get("distributed.grad_accum", "1")),
        )
    except KeyError as e:
        raise UnequalBudgets(f"run {run_id} has no param {e.args[0]}: its budget is unknown") from None


def read_row(client: Any, run_id: str, label: str, searched: list[str]) -> Row:
    """A table row from the MLflow run ``run_id`` (``client``: an ``MlflowClient``)."""
    from tpr_core.eval.metrics import REPORTED_METRICS

    run = client.get_run(run_id)
    params = run.data.params
    budget = _budget_of(params, run_id)
    hist = client.get_metric_history(run_id, f"val/{GATE_METRIC}")
    last_val_step = max((m.step for m in hist), default=0)
    test = {k: run.data.metrics[f"test/{k}"] for k in REPORTED_METRICS if f"test/{k}" in run.data.metrics}
    finished = GATE_METRIC in test
    if finished:
        # The last epoch always validates: the steps it took are measured, not the cap.
        budget = budget._replace(steps_per_epoch=last_val_step // budget.epochs)
        epochs_done: int | None = budget.epochs
    else:
        epochs_done = last_val_step // budget.steps_per_epoch if budget.steps_per_epoch else None
    status = "done" if finished else ("failed" if run.info.status == "FAILED" else "stopped")
    return Row(
        label=label, run_id=run_id, budget=budget, epochs_done=epochs_done, status=status,
        val_r1=max((m.value for m in hist), default=None), test=test,
        searched={k: float(params[k]) for k in searched if k in params},
    )


def trial_run_ids(client: Any, sweep_run_id: str) -> list[str]:
    """The sweep's trial runs (children of its parent run that trained), oldest first."""
    run = client.get_run(sweep_run_id)
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run_id}'",
        max_results=1000,
    )
    trials = [r for r in children if "train.epochs" in r.data.params]
    return [r.info.run_id for r in sorted(trials, key=lambda r: (r.info.start_time, r.info.run_id))]


def check_budgets(rows: list[Row]) -> Budget:
    """The one budget every row trained under; :class:`UnequalBudgets` naming the rows otherwise."""
    if not rows:
        raise UnequalBudgets("no rows to compare")
    first = rows[0].budget
    odd = [r for r in rows if r.budget != first]
    if odd:
        lines = [f"  {r.label} (run {r.run_id}): {r.budget.describe()}" for r in [rows[0], *odd]]
        raise UnequalBudgets("the runs trained under different budgets; not comparing them:\n" + "\n".join(lines))
    return first


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def build_table(rows: list[Row], searched: list[str]) -> Table:
    """The comparison table (after :func:`check_budgets`: refuses unequal budgets)."""
    budget = check_budgets(rows)
    table = Table(
        title=f"every run: {budget.describe()}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
        caption="val R1: best validation R@1 (the sweep and the gate select on it)",
    )
    # On a narrow terminal the run's label wraps; the numbers are never cut.
    table.add_column("run", overflow="fold", min_width=8)
    for key in searched:
        last = key.rsplit(".", 1)[-1]
        table.add_column(_SHORT.get(last, last), justify="right", no_wrap=True, min_width=4)
    for name in ("epochs", "val R1", "test R1"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.label, *[_cell(r.searched.get(k)) for k in searched], r.epochs_cell(), _cell(r.val_r1),
            _cell(r.test.get("R1")),
        )
    return table


def verdict(base_val: float, best_val: float, best_label: str, promoted: bool, gate_reason: str,
            base_test: float | None, best_test: float | None) -> str:
    """What the run shows, in words: did the sweep's best beat the baseline (on val, the split
    the gate decides on), what the gate did, and how the two compare on test."""
    gain = best_val - base_val
    if gain > 0:
        head = f"The sweep's best ({best_label}) beat the baseline on val R1 by {gain:.2f} ({best_val:.2f} vs {base_val:.2f})"
    else:
        head = (f"The sweep's best ({best_label}) did not beat the baseline on val R1 at this budget "
                f"({best_val:.2f} vs {base_val:.2f})")
    gate = f"the gate {'promoted it' if promoted else 'kept the champion'}: {gate_reason}."
    out = f"{head}; {gate}"
    if base_test is not None and best_test is not None:
        side = "higher" if best_test > base_test else ("equal" if best_test == base_test else "lower")
        out += f" On test R1 it is {side}: {best_test:.2f} vs the baseline's {base_test:.2f}."
    return out
