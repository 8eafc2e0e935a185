"""Model registry against a real MLflow server (SQLite store on a temp dir) and real tiny models.

The promotion gate sees an untrained and a trained model whose quality differs for real
(see ``registry_fixtures``); the same model registered twice gives exactly equal metrics.
"""

from __future__ import annotations

import os
import re
import threading

import pytest

mlflow = pytest.importorskip("mlflow")

from pipelines import registry, tracking  # noqa: E402
from tests.pipelines import registry_fixtures as fx  # noqa: E402
from tpr_core.eval.metrics import REPORTED_METRICS  # noqa: E402


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "decision"),
    [
        (50.0, None, 0.0, "promoted"),  # first version
        (50.0, 40.0, 0.0, "promoted"),
        (40.0, 40.0, 0.0, "kept"),  # a tie keeps the champion
        (39.9, 40.0, 0.0, "kept"),
        (42.0, 40.0, 2.0, "kept"),  # a gain of exactly the margin is not enough
        (42.5, 40.0, 2.0, "promoted"),
    ],
)
def test_gate_decision(challenger, champion, margin, decision):
    got, reason = registry.gate_decision(challenger, champion, margin, "val", "7")
    assert got == decision
    if champion is not None:
        assert "champion v7" in reason and f"{challenger:.2f}" in reason


@pytest.fixture(scope="module")
def server():
    """The real tracking server shared with test_serving (started once per test process)."""
    with fx.tracking_uri() as uri:
        yield uri


@pytest.fixture(scope="module")
def runs(server):
    return {kind: fx.log_training_run(kind) for kind in ("untrained", "trained")}


def _aliases(name: str) -> dict[str, str]:
    rm = mlflow.MlflowClient().get_registered_model(name)
    return {a: str(v) for a, v in rm.aliases.items()}


@pytest.fixture(scope="module")
def history(runs):
    """One model through the whole life cycle; the aliases are recorded after every step."""
    name = "gate"
    steps = []
    plan = [
        ("first", "untrained", 0.0),
        ("blocked", "trained", 100.0),  # R1 cannot gain more than 100 points
        ("better", "trained", 0.0),
        ("worse", "untrained", 0.0),
        ("equal", "trained", 0.0),
    ]
    for label, kind, margin in plan:
        res = registry.promote(name, run_id=runs[kind], margin=margin)
        steps.append((label, res, _aliases(name)))
    rb = registry.rollback(name)
    steps.append(("rollback", rb, _aliases(name)))
    return {label: (res, aliases) for label, res, aliases in steps}


def test_first_version_becomes_champion(history):
    res, aliases = history["first"]
    assert (res.version, res.decision, res.exit_code) == ("1", "promoted", 0)
    assert res.champion_metrics is None and res.compared_with is None
    assert aliases == {"champion": "1", "challenger": "1"}


def test_margin_blocks_a_gain_not_above_it(history):
    res, aliases = history["blocked"]
    assert (res.version, res.decision, res.exit_code) == ("2", "kept", registry.EXIT_KEPT)
    assert res.challenger_metrics["R1"] > res.champion_metrics["R1"]  # better, but not by 100 points
    assert aliases == {"champion": "1", "challenger": "2"}


def test_better_is_promoted(history):
    res, aliases = history["better"]
    assert (res.version, res.decision, res.exit_code) == ("3", "promoted", 0)
    assert res.compared_with == "1"
    assert res.challenger_metrics["R1"] > res.champion_metrics["R1"]
    assert aliases == {"champion": "3", "challenger": "3", "previous-champion": "1"}


def test_worse_is_kept(history):
    res, aliases = history["worse"]
    assert (res.version, res.decision, res.exit_code) == ("4", "kept", registry.EXIT_KEPT)
    assert res.compared_with == "3"
    assert res.challenger_metrics["R1"] < res.champion_metrics["R1"]
    assert aliases == {"champion": "3", "challenger": "4", "previous-champion": "1"}


def test_equal_is_kept(history):
    res, aliases = history["equal"]
    assert (res.version, res.decision) == ("5", "kept")
    # The same exported weights, evaluated twice on the same split: exactly the same numbers.
    assert res.challenger_metrics == res.champion_metrics
    assert aliases == {"champion": "3", "challenger": "5", "previous-champion": "1"}


def test_decision_written_on_version(history, runs):
    """A few tags (the weights' hash, where it comes from, the decision); the numbers of both
    sides in the description."""
    from pipelines.registry.common import GATE_R1_TAG, GATE_SPLIT_TAG, WEIGHTS_TAG

    client = mlflow.MlflowClient()
    res, _ = history["worse"]
    mv = client.get_model_version("gate", res.version)
    tags = mv.tags
    assert set(tags) == {WEIGHTS_TAG, "tpr.source_run_id", "tpr.method", "tpr.dataset_manifest_hash",
                         "tpr.decision", "tpr.decision_reason", "tpr.compared_with", GATE_SPLIT_TAG,
                         GATE_R1_TAG}  # fmt: skip
    assert tags[GATE_SPLIT_TAG] == "val" and float(tags[GATE_R1_TAG]) == pytest.approx(res.challenger_metrics["R1"], abs=1e-4)
    assert tags["tpr.decision"] == "kept"
    assert tags["tpr.source_run_id"] == runs["untrained"]
    assert tags["tpr.method"] == "irra"
    assert tags["tpr.dataset_manifest_hash"] == "fixture"
    assert tags["tpr.compared_with"] == "3"
    assert mv.description.startswith("Decision: kept")
    assert f"Challenger v{res.version}: R1 {res.challenger_metrics['R1']:.2f}" in mv.description
    assert f"Champion v3: R1 {res.champion_metrics['R1']:.2f}" in mv.description
    assert f"Trained by run {runs['untrained']} (code {'0' * 40}" in mv.description
    promoted = client.get_model_version("gate", "3")
    assert promoted.tags["tpr.promoted_over"] == "1"
    assert "champion (what is served)" in client.get_registered_model("gate").description


def test_version_comes_from_the_training_run(history, runs):
    """The version registers a retrieval pyfunc logged from the training run itself (no run of
    its own), which carries the gate's evaluation; the training run keeps its status."""
    client = mlflow.MlflowClient()
    res, _ = history["better"]
    mv = client.get_model_version("gate", res.version)
    assert mv.run_id == runs["trained"] and mv.source.startswith("models:/m-")
    model_id = mv.source.removeprefix("models:/")
    served = client.get_logged_model(model_id)
    assert served.name == registry.SERVING_MODEL_NAME and served.source_run_id == runs["trained"]
    gate = {m.key: m for m in served.metrics}
    assert gate["gate/val/R1"].value == pytest.approx(res.challenger_metrics["R1"], abs=1e-4)
    assert (gate["gate/val/R1"].dataset_name, gate["gate/val/R1"].run_id) == ("synthetic", runs["trained"])
    run = client.get_run(runs["trained"])
    assert run.info.status == "FINISHED"
    assert model_id in {o.model_id for o in run.outputs.model_outputs}
    exp = run.info.experiment_id
    assert not client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{runs['trained']}'")


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_the_mlflow_ui_shows_experiment_training_run_and_registered_model(history, runs, server, tmp_path):
    """scripts/mlflow_screenshots.py in headless Chromium against the store of this module: the
    experiment opens on its runs table (both training runs, their dataset), the training run
    page shows its dataset, description, logged models and version, the registered model page its
    description, aliases and the gate's decision."""
    import shutil
    import subprocess
    import sys

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("neither chromium nor chromium-browser is on PATH: the UI screenshots need one")
    client = mlflow.MlflowClient()
    trained = client.get_run(runs["trained"])
    ds = trained.inputs.dataset_inputs[0].dataset
    done = subprocess.run(
        [sys.executable, str(fx.REPO / "scripts/mlflow_screenshots.py"), "--tracking-uri", server,
         "--run-id", runs["trained"], "--model", "gate", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=fx.REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    pages = {}
    for name in ("experiment", "training_run", "registered_model"):
        assert _png_size(tmp_path / f"{name}.png") == (1800, 1300)
        pages[name] = (tmp_path / f"{name}.html").read_text()
    assert all(n in pages["experiment"] for n in ("train-trained", "train-untrained", ds.name, "Model training"))
    run_page = pages["training_run"]
    assert all(n in run_page for n in ("train-trained", f"{ds.name} ({ds.digest})", "Finished", "gate"))
    models = {o.model_id for o in trained.outputs.model_outputs}
    assert any(m in run_page for m in models)
    model_page = pages["registered_model"]
    assert "champion (what is served)" in model_page and "@&nbsp;champion" in model_page
    assert "Decision: promoted" in model_page


def test_registered_model_reproduces_run_metrics(history):
    """The version's re-evaluation on the run's split equals the metrics the run logged."""
    res, _ = history["better"]
    run = mlflow.MlflowClient().get_run(res.source_run_id)
    for k in REPORTED_METRICS:
        assert res.challenger_metrics[k] == pytest.approx(run.data.metrics[f"val/{k}"], abs=1e-4), k


def test_weights_hash_is_recorded_and_a_changed_artifact_refused(history, tmp_path):
    """The version carries its weights' SHA-256; a download whose weights differ from it (an
    artifact changed after registration, played here by changing the recorded hash) is refused."""
    from pipelines.registry.common import WEIGHTS_TAG, sha256_file

    res, _ = history["better"]
    client = mlflow.MlflowClient()
    want = client.get_model_version("gate", res.version).tags[WEIGHTS_TAG]
    folder = registry.download_registered_model(f"models:/gate/{res.version}", tmp_path / "ok")
    assert sha256_file(registry.exported_dir_of(folder) / "model.safetensors") == want
    client.set_model_version_tag("gate", res.version, WEIGHTS_TAG, "0" * 64)
    try:
        with pytest.raises(registry.RegistryError, match=rf"models:/gate/{res.version}: model.safetensors "
                           rf"\({want}\) is not the file registered"):
            registry.download_registered_model(f"models:/gate/{res.version}", tmp_path / "bad")
    finally:
        client.set_model_version_tag("gate", res.version, WEIGHTS_TAG, want)


def test_rollback(history):
    rb, aliases = history["rollback"]
    assert (rb.from_version, rb.to_version, rb.previous_champion) == ("3", "1", None)
    assert aliases == {"champion": "1", "challenger": "5"}
    v1 = mlflow.MlflowClient().get_model_version("gate", "1")
    assert v1.tags["tpr.decision"] == "rollback" and v1.tags["tpr.rollback.from_version"] == "3"
    assert "Rollback" in v1.description
    with pytest.raises(registry.RegistryError, match="previous-champion"):
        registry.rollback("gate")


def test_sweep_resolves_best_trial(runs):
    client = mlflow.MlflowClient()
    sweep = tracking.start_or_resume_run("tpr-registry-tests", "sweep-1", run_name="sweep")
    client.set_tag(sweep, tracking.BEST_TRIAL_TAG, runs["trained"])
    assert registry.resolve_source_run(sweep_run_id=sweep) == runs["trained"]
    bare = tracking.start_or_resume_run("tpr-registry-tests", "sweep-2", run_name="sweep")
    with pytest.raises(registry.RegistryError, match=tracking.BEST_TRIAL_TAG):
        registry.resolve_source_run(sweep_run_id=bare)
    with pytest.raises(registry.RegistryError, match="exactly one"):
        registry.resolve_source_run(run_id="a", sweep_run_id="b")


def test_lock_is_mutually_exclusive(server):
    """Read-modify-write of a counter under the lock from 4 threads loses no update."""
    client = mlflow.MlflowClient()
    client.create_registered_model("counter", tags={"n": "0"})
    errors = []

    def bump(times: int) -> None:
        try:
            for _ in range(times):
                with registry.PromotionLock("counter", poll_s=0.05):
                    n = int(client.get_registered_model("counter").tags["n"])
                    client.set_registered_model_tag("counter", "n", str(n + 1))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=bump, args=(5,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert client.get_registered_model("counter").tags["n"] == "20"
    # Released: the lock model is gone.
    names = {m.name for m in client.search_registered_models()}
    assert "counter" + registry.LOCK_SUFFIX not in names


def test_lock_timeout_and_stale_lock(server):
    holder = registry.PromotionLock("stale", ttl_s=3600)
    holder.acquire()
    try:
        with pytest.raises(registry.PromotionLockTimeout, match="held by"):
            registry.PromotionLock("stale", timeout_s=0.5, poll_s=0.05).acquire()
    finally:
        holder.release()
    # A lock whose holder died (its TTL passed) is broken by the next one.
    dead = registry.PromotionLock("stale", ttl_s=0.0)
    dead.acquire()  # never released
    with registry.PromotionLock("stale", timeout_s=10, poll_s=0.05) as lk:
        owner = (
            mlflow.MlflowClient().get_registered_model("stale" + registry.LOCK_SUFFIX).tags["tpr.lock.owner"]
        )
        assert owner == lk.owner


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_whose_owner_exited_on_this_host_is_broken_at_once(server):
    import socket

    client = mlflow.MlflowClient()
    tags = {"tpr.lock.owner": "gone", "tpr.lock.host": socket.gethostname(), "tpr.lock.pid": str(_dead_pid()),
            "tpr.lock.started": "2026-01-01T00:00:00+0000", "tpr.lock.ttl_s": "3600"}  # fmt: skip
    client.create_registered_model("orphan" + registry.LOCK_SUFFIX, tags=tags)
    with registry.PromotionLock("orphan", timeout_s=5, poll_s=0.05) as lk:
        assert client.get_registered_model("orphan" + registry.LOCK_SUFFIX).tags["tpr.lock.owner"] == lk.owner


def test_a_waiter_names_the_holder_and_break_lock_removes_it(server, capsys):
    holder = registry.PromotionLock("held", ttl_s=3600)
    holder.acquire()
    tags = mlflow.MlflowClient().get_registered_model("held" + registry.LOCK_SUFFIX).tags
    who = rf"pid {os.getpid()} on {re.escape(tags['tpr.lock.host'])} since {re.escape(tags['tpr.lock.started'])}"
    with pytest.raises(registry.PromotionLockTimeout, match=rf"held by {who}; gave up after 0s"):
        registry.PromotionLock("held", timeout_s=0.3, poll_s=0.05).acquire()
    assert re.search(rf"waiting for the promotion lock of 'held', held by {who}", capsys.readouterr().err)
    assert re.fullmatch(who, registry.break_lock("held"))
    assert registry.break_lock("held") is None
    with registry.PromotionLock("held", timeout_s=5, poll_s=0.05):
        pass


def test_an_interrupted_promotion_is_rejected_by_the_next_one(runs):
    """A promotion killed inside its gate leaves ``challenger`` on an undecided version; the next
    promotion (or rollback) marks that version rejected and takes the alias off it."""
    name = "interrupted"
    client = mlflow.MlflowClient()
    first = registry.promote(name, run_id=runs["untrained"])
    mv = mlflow.register_model(first.model_uri, name)  # registered, then "killed" in the gate:
    client.set_registered_model_alias(name, registry.CHALLENGER, mv.version)  # alias, no decision
    second = registry.promote(name, run_id=runs["trained"])
    stuck = client.get_model_version(name, mv.version)
    assert stuck.tags["tpr.decision"] == "rejected"
    assert "stopped before the gate decided" in stuck.tags["tpr.decision_reason"]
    assert _aliases(name)[registry.CHALLENGER] == second.version != str(mv.version)


def test_concurrent_promotions_keep_aliases_consistent(runs):
    """Two equally good challengers at once: exactly one is promoted over v1, the other is kept
    against it; without the lock both would read v1 as champion and both be promoted."""
    name = "race"
    registry.promote(name, run_id=runs["untrained"])
    results, errors = [], []

    def go() -> None:
        try:
            results.append(registry.promote(name, run_id=runs["trained"]))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 2
    promoted = [r for r in results if r.decision == "promoted"]
    kept = [r for r in results if r.decision == "kept"]
    assert len(promoted) == 1 and len(kept) == 1
    assert promoted[0].compared_with == "1"
    assert kept[0].compared_with == promoted[0].version
    aliases = _aliases(name)
    assert aliases["champion"] == promoted[0].version
    assert aliases["previous-champion"] == "1"
    assert aliases["challenger"] in {r.version for r in results}


def test_cli_promote_evaluate_rollback(runs, tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from pipelines import registry_cli

    app = typer.Typer()
    registry_cli.register(app)
    cli = CliRunner()
    sweep = tracking.start_or_resume_run("tpr-registry-tests", "sweep-cli", run_name="sweep")
    mlflow.MlflowClient().set_tag(sweep, tracking.BEST_TRIAL_TAG, runs["trained"])

    first = cli.invoke(app, ["promote", "--model-name", "cli", "--sweep", sweep])
    assert first.exit_code == 0, first.output
    assert "promoted" in first.output and "first version" in first.output
    kept = cli.invoke(app, ["promote", "--model-name", "cli", "--run", runs["untrained"], "--split", "val"])
    assert kept.exit_code == registry.EXIT_KEPT, kept.output
    assert "kept" in kept.output
    both = cli.invoke(app, ["promote", "--model-name", "cli", "--run", "a", "--sweep", "b"])
    assert both.exit_code == 2

    # evaluate the champion: the numbers the training run logged, plus the pictures.
    out = tmp_path / "eval"
    ev = cli.invoke(app, ["evaluate", "--model", "models:/cli@champion", "--split", "val", "--out", str(out)])
    assert ev.exit_code == 0, ev.output
    got = json.loads((out / "metrics.json").read_text())
    logged = mlflow.MlflowClient().get_run(runs["trained"]).data.metrics
    assert got["R1"] == pytest.approx(logged["val/R1"], abs=1e-4)
    for png in ("retrieval_grid.png", "recall_at_k.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    ck = cli.invoke(app, ["evaluate", "--checkpoint", fx.exported_model("untrained"), "--split", "val"])
    assert ck.exit_code == 0 and "R1" in ck.output

    rb = cli.invoke(app, ["rollback", "--model-name", "cli"])
    assert rb.exit_code == 2 and "previous-champion" in rb.output


def test_rollback_walks_the_promotion_chain(runs):
    """v1 <- v2 <- v3 (each promoted over the previous): rollbacks go 3 -> 2 -> 1, then stop."""
    client = mlflow.MlflowClient()
    name = "chain"
    client.create_registered_model(name)
    for v in ("1", "2", "3"):
        tags = {"tpr.promoted_over": str(int(v) - 1)} if v != "1" else {}
        mv = client.create_model_version(name, f"runs:/{runs['trained']}/model", runs["trained"], tags=tags)
        assert str(mv.version) == v
    client.set_registered_model_alias(name, registry.CHAMPION, "3")
    client.set_registered_model_alias(name, registry.PREVIOUS, "2")

    first = registry.rollback(name)
    assert (first.from_version, first.to_version, first.previous_champion) == ("3", "2", "1")
    assert _aliases(name) == {"champion": "2", "previous-champion": "1"}
    second = registry.rollback(name)
    assert (second.from_version, second.to_version, second.previous_champion) == ("2", "1", None)
    assert _aliases(name) == {"champion": "1"}
    assert client.get_model_version(name, "3").tags["tpr.rolled_back"]
    with pytest.raises(registry.RegistryError):
        registry.rollback(name)


def test_a_killed_promotion_is_recovered_by_the_next_one(runs, server, tmp_path):
    """SIGKILL a real ``tpr promote`` while it holds the lock, inside its gate: the lock and an
    undecided version with the ``challenger`` alias stay behind. The next ``tpr promote`` breaks
    the dead owner's lock at once, rejects the orphan, says both, and decides its own version."""
    import signal
    import subprocess
    import sys
    import time


    name = "killed"
    client = mlflow.MlflowClient()
    registry.promote(name, run_id=runs["untrained"])  # v1, the champion the gate will evaluate
    code = "import sys; from pipelines.cli import main; sys.argv[0] = 'tpr'; main()"
    cmd = [sys.executable, "-c", code, "promote", "--model-name", name, "--run", runs["trained"]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    victim = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while _aliases(name).get(registry.CHALLENGER, "1") == "1":  # v2 in its gate, under the lock
            assert victim.poll() is None and time.monotonic() < deadline, "the promotion ended before the kill"
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        victim.wait(timeout=60)
    assert "tpr.decision" not in client.get_model_version(name, "2").tags
    assert client.get_registered_model(f"{name}{registry.LOCK_SUFFIX}")  # the lock is left behind

    nxt = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    said = " ".join((nxt.stdout + nxt.stderr).split())
    assert nxt.returncode == 0, said[-3000:]
    assert f"breaking the promotion lock of {name!r}" in said and "has exited" in said
    assert f"{name} v2: its promotion was interrupted; marked rejected" in said
    assert client.get_model_version(name, "2").tags["tpr.decision"] == "rejected"
    assert _aliases(name) == {"champion": "3", "challenger": "3", "previous-champion": "1"}
