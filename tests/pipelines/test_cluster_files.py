"""Checks on everything under ``cluster/``: the files parse, agree with each other and with the
repo, every ``tpr`` command they show parses against the real CLI, and ``cluster/submit.sh``
behaves without a cluster (ids, help, dry run). Submitting to a real local Ray cluster is the
integration test's job.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SUBMIT = CLUSTER / "submit.sh"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in _docs(p) if isinstance(d, dict) and "kind" in d]


def _ray_manifests() -> list[tuple[Path, dict]]:
    """Each RayCluster spec with its file: the RayCluster's own and the one inside the RayJob."""
    out = []
    for path, obj in _k8s_objects():
        if obj["kind"] == "RayCluster":
            out.append((path, obj["spec"]))
        elif obj["kind"] == "RayJob":
            out.append((path, obj["spec"]["rayClusterSpec"]))
    return out


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return pods


def _run_submit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    base.update(env or {})
    return subprocess.run(
        ["bash", str(SUBMIT), *args], cwd=REPO, env=base, capture_output=True, text=True, timeout=60
    )


# ---------------------------------------------------------------------------------------- parsing


def test_cluster_has_the_expected_files() -> None:
    expected = [
        "runtime_env.yaml",
        "submit.sh",
        "aws-cluster.yaml",
        "kuberay-rayjob.yaml",
        "kuberay-raycluster.yaml",
        "kuberay-shared-pvc.yaml",
        "Dockerfile",
        "README.md",
        "mlflow/docker-compose.yaml",
        "mlflow/k8s.yaml",
        "mlflow/.env.example",
        "mlflow/jobs.env.example",
    ]
    missing = [name for name in expected if not (CLUSTER / name).is_file()]
    assert not missing, f"missing in cluster/: {missing}"


@pytest.mark.parametrize("path", YAML_FILES, ids=[_rel(p) for p in YAML_FILES])
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{_rel(path)}: no YAML document"
    for i, doc in enumerate(docs):
        assert isinstance(doc, dict), (
            f"{_rel(path)} document {i}: top level is {type(doc).__name__}, not a mapping"
        )


def test_kubernetes_objects_name_api_and_kind() -> None:
    objs = _k8s_objects()
    kinds = {obj["kind"] for _, obj in objs}
    assert {"RayJob", "RayCluster", "PersistentVolumeClaim", "Deployment", "Service"} <= kinds, kinds
    for path, obj in objs:
        where = f"{_rel(path)} {obj['kind']}"
        assert obj.get("apiVersion"), f"{where}: no apiVersion"
        assert obj.get("metadata", {}).get("name"), f"{where}: no metadata.name"
        if obj["kind"] in {"RayJob", "RayCluster"}:
            assert obj["apiVersion"] == "ray.io/v1", f"{where}: apiVersion {obj['apiVersion']}"


# ------------------------------------------------------------------------------ versions agree


def test_ray_and_mlflow_versions_match_the_installed_ones() -> None:
    import mlflow
    import ray

    pins = (REPO / "pyproject.toml").read_text()
    assert f"=={ray.__version__}" in pins and f"=={mlflow.__version__}" in pins, (
        "pyproject pins differ from .venv"
    )
    for path, spec in _ray_manifests():
        assert spec["rayVersion"] == ray.__version__, f"{_rel(path)}: rayVersion {spec['rayVersion']}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M)
    assert base, "cluster/Dockerfile: no `ARG RAY_IMAGE=...` line"
    # Official tag layout: rayproject/ray:VERSION-pyXY-cuXYZ.
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-cu\d{{3}}", base.group(1)), (
        base.group(1)
    )
    mlflow_docker = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow[auth]=={mlflow.__version__}" in mlflow_docker, (
        "cluster/mlflow/Dockerfile pins another MLflow"
    )


def test_dockerfile_builds_deepspeed_after_torch_without_isolation() -> None:
    lines = [ln for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if ln.startswith("RUN ")]
    torch_at = next(i for i, ln in enumerate(lines) if '"torch==' in ln)
    ds_at = next(i for i, ln in enumerate(lines) if "deepspeed==" in ln)
    project_at = next(i for i, ln in enumerate(lines) if "pip install ." in ln)
    assert torch_at < ds_at < project_at, lines
    assert "--no-build-isolation" in lines[ds_at]
    pins = (REPO / "pyproject.toml").read_text()
    for pin in re.findall(r'"((?:torch|torchvision|deepspeed)==[^"]+)"', "\n".join(lines)):
        assert f'"{pin}"' in pins, f"cluster/Dockerfile installs {pin}, pyproject.toml pins another version"


# ---------------------------------------------------------------------------------- KubeRay


def test_ray_clusters_have_cpu_head_gpu_workers_shared_volume_and_token_auth() -> None:
    pvc_names = {
        obj["metadata"]["name"] for _, obj in _k8s_objects() if obj["kind"] == "PersistentVolumeClaim"
    }
    manifests = _ray_manifests()
    assert len(manifests) == 2, [(_rel(p), s.keys()) for p, s in manifests]
    for path, spec in manifests:
        where = _rel(path)
        assert spec["authOptions"]["mode"] == "token", where
        assert spec["authOptions"]["secretName"] == "tpr-ray-token", where
        for group, pod in _pod_specs(spec):
            (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if group == "head":
                assert gpus is None, f"{where}: the head asks for GPUs"
            else:
                assert int(gpus) >= 1, f"{where} group {group}: no nvidia.com/gpu limit"
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/mnt/shared" in mounts, f"{where} group {group}: /mnt/shared not mounted"
            assert claims.get(mounts["/mnt/shared"]) in pvc_names, (
                f"{where} group {group}: unknown PVC {claims}"
            )
            secrets = {e["secretRef"]["name"] for e in container.get("envFrom", [])}
            assert "tpr-mlflow" in secrets, (
                f"{where} group {group}: MLflow env not from the tpr-mlflow Secret"
            )
        for g in spec["workerGroupSpecs"]:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (
                f"{where}: {g['groupName']} replicas"
            )


def test_rayjob_runs_the_fmfa_sweep_and_cleans_up() -> None:
    (job,) = [obj for _, obj in _k8s_objects() if obj["kind"] == "RayJob"]
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["tpr", "sweep", "pipelines/configs/fmfa_cuhk_base.yaml"], argv
    assert argv[argv.index("--space") + 1] == "tune_spaces/fmfa.yaml"
    assert argv[argv.index("--runs-dir") + 1] == "/mnt/shared/tpr-runs"
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_runtime_env_carries_the_same_env_vars_as_runtime_env_yaml() -> None:
    (job,) = [obj for _, obj in _k8s_objects() if obj["kind"] == "RayJob"]
    inline = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert inline["env_vars"] == shared["env_vars"], (
        "kuberay-rayjob.yaml runtimeEnvYAML drifted from runtime_env.yaml"
    )


# ---------------------------------------------------------------------------------- runtime env


def test_runtime_env_is_valid_for_ray_and_holds_no_secrets() -> None:
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of field names and types
    assert "working_dir" not in env, "submit.sh passes --working-dir; a value here would be overridden"
    assert "pip" not in env and "conda" not in env, "dependencies come from the image"
    env_vars = env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), env_vars
    assert env_vars["TOKENIZERS_PARALLELISM"] == "false"
    assert env_vars["HF_HUB_OFFLINE"] == "1"
    assert "DS_ACCELERATOR" not in env_vars, "GPU jobs use NCCL; DS_ACCELERATOR is for CPU-only runs"
    assert not [k for k in env_vars if re.search("PASSWORD|SECRET|TOKEN$|ACCESS_KEY", k)], env_vars


def test_working_dir_upload_keeps_all_sources_and_drops_local_state(tmp_path: Path) -> None:
    """Build the package `ray job submit --working-dir .` would upload (Ray's own packer, with the
    repo's ignore files and the excludes of runtime_env.yaml) from a copy of the repo's sources
    plus planted local state, and look inside."""
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    tree = tmp_path / "repo"
    for name in ("tpr_core", "pipelines", "tune_spaces", "cluster"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore", ".rayignore"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, tree / name)
    planted = [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/exp/checkpoint.pt",
        "data/cuhk-pedes/part-0.parquet",
        "mlruns/0/meta.yaml",
    ]
    for rel in planted:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("local state")
    pkg = tmp_path / "pkg.zip"
    create_package(str(tree), pkg, include_gitignore=True, excludes=env["excludes"])
    names = set(zipfile.ZipFile(pkg).namelist())

    sources = [
        p.relative_to(tree).as_posix()
        for root in ("tpr_core", "pipelines", "tune_spaces", "cluster")
        for p in (tree / root).rglob("*")
        if p.is_file() and p.suffix in {".py", ".yaml", ".sh"}
    ] + ["pyproject.toml"]
    assert len(sources) > 10, sources
    lost = sorted(set(sources) - names)
    assert not lost, (
        f"the job upload would lose {len(lost)} source files (a .gitignore or excludes pattern "
        f"matches them; anchor it with a leading '/'): {lost[:20]}"
    )
    leaked = sorted(n for n in names if n in planted)
    assert not leaked, f"the job upload would include local state: {leaked}"


# ---------------------------------------------------------------------------- cluster launcher


def test_aws_cluster_config_passes_ray_validation() -> None:
    # Ray's private helpers, exactly what `ray up` runs before it talks to AWS (Ray is pinned).
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))
    broken = copy.deepcopy(raw)
    broken["available_node_types"][raw["head_node_type"]]["min_wrokers"] = 0  # typo must be caught
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_aws_cluster_has_cpu_head_and_spot_gpu_workers() -> None:
    cfg = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]["InstanceType"]
    assert head.split(".")[0][0] in "mcr", f"head {head} is not a CPU instance family"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert workers
    for name, t in workers.items():
        nc = t["node_config"]
        assert nc["InstanceType"].split(".")[0][0] in "gp", (
            f"{name}: {nc['InstanceType']} is not a GPU family"
        )
        assert nc["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert "RAY_AUTH_MODE=token" in " ".join(
        cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    )
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


# ------------------------------------------------------------------------------- MLflow server


def test_mlflow_server_uses_postgres_s3_proxy_and_basic_auth() -> None:
    script = (CLUSTER / "mlflow" / "start-server.sh").read_text()
    for flag in (
        "--backend-store-uri",
        "--artifacts-destination",
        "--serve-artifacts",
        "--app-name basic-auth",
    ):
        assert flag in script, f"cluster/mlflow/start-server.sh lacks {flag}"
    assert "postgresql://" in script
    example = dict(
        line.split("=", 1)
        for line in (CLUSTER / "mlflow" / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert example["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    compose = yaml.safe_load((CLUSTER / "mlflow" / "docker-compose.yaml").read_text())
    server_env = compose["services"]["tpr-mlflow"]["environment"]
    # Every variable start-server.sh insists on is passed by compose and offered by the example.
    required = re.search(r"for var in (.*?); do", script, re.S).group(1).replace("\\", " ").split()
    assert required
    for var in required:
        assert var in server_env, f"docker-compose.yaml does not pass {var}"
        assert var in example or var == "MLFLOW_DB_HOST", f".env.example does not offer {var}"
    jobs = (CLUSTER / "mlflow" / "jobs.env.example").read_text()
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert re.search(rf"^{var}=", jobs, re.M), f"jobs.env.example lacks {var}"


def test_start_server_script_is_valid_sh() -> None:
    res = subprocess.run(
        ["sh", "-n", str(CLUSTER / "mlflow" / "start-server.sh")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------- paths and tpr commands

_PATH_RE = re.compile(r"(?<![\w/.~$-])((?:pipelines/configs|tune_spaces|cluster|scripts)/[\w./-]*[\w-])")


def test_every_repo_path_named_in_cluster_files_exists() -> None:
    missing: dict[str, set[str]] = {}
    for path in TEXT_FILES:
        for m in _PATH_RE.finditer(path.read_text(errors="replace")):
            named = m.group(1)
            if not (REPO / named).exists():
                missing.setdefault(named, set()).add(_rel(path))
    # COPY sources of the node image.
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in [t for t in line.split()[1:-1] if not t.startswith("--")]:
                if not (REPO / src).exists():
                    missing.setdefault(src, set()).add("cluster/Dockerfile (COPY)")
    assert not missing, "paths named in cluster/ that do not exist in the repo:\n" + "\n".join(
        f"  {p}  (named in {', '.join(sorted(w))})" for p, w in sorted(missing.items())
    )


def _logical_lines(text: str, comments_only: bool = False) -> list[str]:
    """Lines with a leading comment marker removed and backslash continuations joined."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if comments_only and not raw.lstrip().startswith("#"):
            continue
        line = re.sub(r"^\s*#\s?", "", raw).strip()
        line = re.sub(r"^\$\s+", "", line)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


_SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1"}


def _tpr_commands(text: str, comments_only: bool = False) -> list[list[str]]:
    """Argument lists of the `tpr ...` commands shown in a text: at the start of a (comment) line
    or after a `--` (submit.sh / ray job submit). Placeholders like `tpr COMMAND` are skipped."""
    found = []
    for line in _logical_lines(text, comments_only):
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            if tok != "tpr" or (i > 0 and tokens[i - 1] not in {"--", *_SHELL_STOP}):
                continue
            args = []
            for t in tokens[i + 1 :]:
                if t in _SHELL_STOP or t.startswith((">", "2>")):
                    break
                args.append(t)
            # Placeholders (`tpr COMMAND`, `tpr [...]`) and root options (`tpr --help`) are not commands.
            if args and not re.fullmatch(r"[A-Z_]+|\[.*|<.*|\.\.\.|-.*", args[0]):
                found.append(args)
    return found


def _entrypoints() -> list[tuple[str, list[str]]]:
    cmds = []
    for path in TEXT_FILES:
        if path.suffix in {".md", ".sh"} or path.name == "Dockerfile":
            cmds += [(_rel(path), c) for c in _tpr_commands(path.read_text())]
        elif path.suffix in {".yaml", ".yml"}:  # YAML values are read structurally below
            cmds += [(_rel(path), c) for c in _tpr_commands(path.read_text(), comments_only=True)]
    for path, obj in _k8s_objects():
        if obj["kind"] == "RayJob":
            argv = shlex.split(obj["spec"]["entrypoint"])
            assert argv[0] == "tpr", f"{_rel(path)}: entrypoint does not run tpr: {argv}"
            cmds.append((f"{_rel(path)} spec.entrypoint", argv[1:]))
    return cmds


def test_command_extraction_finds_the_documented_commands() -> None:
    # Guards the extractor itself: if it silently found nothing, the CLI check below would pass.
    cmds = _entrypoints()
    subcommands = {args[0] for _, args in cmds}
    assert {"sweep", "train", "promote", "data"} <= subcommands, subcommands
    assert any(w.endswith("spec.entrypoint") for w, _ in cmds)
    assert _tpr_commands("cluster/submit.sh -- tpr sweep a.yaml --space b.yaml | tee x") == [
        ["sweep", "a.yaml", "--space", "b.yaml"]
    ]
    assert _tpr_commands("# run `tpr` as a tpr command\n-- tpr COMMAND [ARGS...]") == []


def test_every_tpr_command_in_cluster_files_parses_with_the_real_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse (never run) each command with the `tpr` CLI's own parser: unknown subcommands,
    unknown options and missing arguments are errors."""
    import typer.exceptions
    import typer.main

    from pipelines.cli import app

    root = typer.main.get_command(app)
    # Path arguments that must exist are checked relative to the repo root, where jobs start.
    monkeypatch.chdir(REPO)
    problems = []
    parsed = 0
    for where, args in _entrypoints():
        cmd, name, rest = root, "tpr", list(args)
        while hasattr(cmd, "list_commands"):  # a command group: descend by name
            ctx = cmd.context_class(cmd, info_name=name)
            sub = cmd.get_command(ctx, rest[0]) if rest else None
            if sub is None:
                problems.append(
                    f"{where}: `tpr {' '.join(args)}`: `{name}` has no subcommand {rest[:1]} "
                    f"(it has {sorted(cmd.list_commands(ctx))})"
                )
                break
            cmd, name, rest = sub, rest[0], rest[1:]
        else:
            try:
                cmd.make_context(name, rest)
                parsed += 1
            except typer.exceptions.TyperException as e:
                problems.append(f"{where}: `tpr {' '.join(args)}`: {e.format_message()}")
    assert not problems, "tpr commands in cluster/ that the CLI rejects:\n" + "\n".join(problems)
    assert parsed == len(_entrypoints())


def test_cli_check_rejects_what_the_cli_rejects() -> None:
    # Guards the check above against passing vacuously: the same parser must refuse a bad option.
    import typer.exceptions
    import typer.main

    from pipelines.cli import app

    root = typer.main.get_command(app)
    data = root.get_command(root.context_class(root, info_name="tpr"), "data")
    synth = data.get_command(data.context_class(data, info_name="data"), "synth")
    synth.make_context("synth", ["--out", "x"])
    with pytest.raises(typer.exceptions.TyperException, match="--bogus"):
        synth.make_context("synth", ["--out", "x", "--bogus"])


# ----------------------------------------------------------------------------------- submit.sh


def test_submit_sh_syntax() -> None:
    res = subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_submit_sh_help() -> None:
    res = _run_submit("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: cluster/submit.sh")
    for word in (
        "--address",
        "--id",
        "--no-wait",
        "--runtime-env",
        "--working-dir",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
    ):
        assert word in res.stdout, word


def test_submit_sh_submission_id_is_sha1_of_the_argv() -> None:
    argv = ["tpr", "sweep", "pipelines/configs/fmfa_cuhk_base.yaml", "--space", "tune_spaces/fmfa.yaml"]
    expected = "tpr-sweep-" + hashlib.sha1(b"".join(a.encode() + b"\0" for a in argv)).hexdigest()[:12]
    first = _run_submit("--print-id", "--", *argv)
    again = _run_submit("--address", "http://10.0.0.1:8265", "--no-wait", "--print-id", "--", *argv)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == expected
    assert again.stdout.strip() == expected, "options of submit.sh itself must not change the id"
    other = _run_submit("--print-id", "--", *argv, "--samples", "8").stdout.strip()
    assert other != expected and other.startswith("tpr-sweep-")
    # Argument boundaries count: `"a b"` is not `a b`.
    joined = _run_submit("--print-id", "--", "tpr", "train", "a b").stdout.strip()
    split = _run_submit("--print-id", "--", "tpr", "train", "a", "b").stdout.strip()
    assert joined != split
    assert _run_submit("--print-id", "--", "tpr", "data", "synth", "--out", "x").stdout.startswith(
        "tpr-data-synth-"
    )
    assert _run_submit("--id", "my-sweep-2", "--print-id", "--", *argv).stdout.strip() == "my-sweep-2"


def test_submit_sh_dry_run_shows_the_ray_job_submit_line() -> None:
    res = _run_submit(
        "--dry-run",
        "--entrypoint-num-cpus",
        "1",
        "--",
        "tpr",
        "train",
        "pipelines/configs/irra_synthetic_tiny.yaml",
    )
    assert res.returncode == 0, res.stderr
    argv = shlex.split(res.stdout.splitlines()[0])
    assert argv[1:3] == ["job", "submit"]
    opt = {
        argv[i]: argv[i + 1]
        for i in range(3, argv.index("--"))
        if argv[i].startswith("--") and i + 1 < len(argv)
    }
    assert opt["--address"] == "http://127.0.0.1:8265"
    assert Path(opt["--working-dir"]) == REPO
    assert Path(opt["--runtime-env"]) == CLUSTER / "runtime_env.yaml"
    assert opt["--entrypoint-num-cpus"] == "1"
    assert re.fullmatch(r"tpr-train-[0-9a-f]{12}", opt["--submission-id"])
    assert "--no-wait" in argv  # always: submit.sh follows logs itself, so a retry can reattach
    assert argv[argv.index("--") + 1 :] == ["tpr", "train", "pipelines/configs/irra_synthetic_tiny.yaml"]


def test_submit_sh_retries_while_a_new_cluster_has_no_job_agent(tmp_path: Path) -> None:
    """A just-started cluster refuses the first submit ("No available agent ... try again later",
    seen in a loaded CI run): submit.sh tries again and submits once the agent answers. The
    cluster side is a script standing in for the `ray` CLI that records every call."""
    calls, fake = tmp_path / "calls", tmp_path / "ray"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
case "$1 $2" in
  "job status") echo "Job 'x' does not exist"; exit 1 ;;
  "job submit")
    if [[ $(grep -c '^job submit' {calls}) -lt 2 ]]; then
      echo "RuntimeError: Request failed with status code 500: No available agent to submit job, please try again later.."
      exit 1
    fi
    echo "Job 'x' submitted successfully"; exit 0 ;;
esac
""")
    fake.chmod(0o755)
    res = _run_submit("--no-wait", "--", "tpr", "train", "pipelines/configs/irra_synthetic_tiny.yaml",
                      env={"RAY_BIN": str(fake)})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [c.split()[:2] for c in calls.read_text().splitlines()].count(["job", "submit"]) == 2
    assert "job agent is not up yet" in res.stderr and "submitted tpr-train-" in res.stderr
    # Past TPR_SUBMIT_AGENT_WAIT_S it gives up with Ray's own message.
    calls.write_text("")
    fake.write_text(fake.read_text().replace("-lt 2", "-lt 99"))
    res = _run_submit("--no-wait", "--", "tpr", "train", "pipelines/configs/irra_synthetic_tiny.yaml",
                      env={"RAY_BIN": str(fake), "TPR_SUBMIT_AGENT_WAIT_S": "0"})  # fmt: skip
    assert res.returncode == 2 and "No available agent" in res.stderr and "ray job submit failed" in res.stderr


def test_submit_sh_forwards_tracking_uri_and_env_but_refuses_secrets() -> None:
    res = _run_submit(
        "--dry-run",
        "--env",
        "DS_ACCELERATOR=cpu",
        "--",
        "tpr",
        "train",
        "x.yaml",
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_ADDRESS": "http://10.1.2.3:8265"},
    )
    assert res.returncode == 0, res.stderr
    assert "--address http://10.1.2.3:8265" in res.stdout
    assert "# runtime env var: MLFLOW_TRACKING_URI" in res.stdout
    assert "# runtime env var: DS_ACCELERATOR" in res.stdout
    for bad in (["--env", "MLFLOW_TRACKING_PASSWORD=x"], ["--env", "RAY_AUTH_TOKEN=x"], ["--env", "1BAD=x"]):
        refused = _run_submit("--dry-run", *bad, "--", "tpr", "train", "x.yaml")
        assert refused.returncode == 2, (bad, refused.stdout)


def test_submit_sh_rejects_bad_usage() -> None:
    for args in (
        ["tpr", "train", "x"],
        ["--", "python", "train.py"],
        ["--"],
        ["--", "tpr"],
        ["--bogus", "--", "tpr", "train"],
    ):
        res = _run_submit(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "submit.sh: error:" in res.stderr, (args, res.stderr)
