"""A real two-node Ray cluster on loopback: a head and a second node, each its own ``ray start``
in its own session, so that one node can be lost (every process of its session SIGKILLed) and
the other lives on. Used by ``bench/node_loss.py`` and ``tests/pipelines/test_node_loss.py``.

Both nodes run on this machine but are separate Ray nodes: own raylet, own ``--temp-dir``, own
ports (free ones, picked here: another Ray instance on the machine keeps its own). The cluster
uses a private token (``RAY_AUTH_MODE=token``) held in the environment of the nodes and of the
drivers given :meth:`LocalCluster.env`; nothing is written to ``~/.ray``. Teardown kills only
the sessions started here (never ``ray stop``: it stops every Ray instance on the machine).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.tracking_server import _free_port

REPO = Path(__file__).resolve().parents[2]
SECOND_NODE_RESOURCE = "tpr_second_node"  # a custom resource only the second node has
_RAY = str(Path(sys.executable).with_name("ray"))


def _wait_exit(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def _session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (from /proc; Linux)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``."""
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# A dead node noticed by the GCS after 3 missed checks of 0.5 s, sooner than with Ray's own
# settings (cluster/README.md "What survives what" has the figures of both).
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}


def answer(ray, question: str) -> object:
    """Asked of a driver connected to the cluster: ``"resources"``, what its alive nodes hold;
    ``"nodes"``, ``{"head": id, "second": id}`` (the second: the node with the custom resource)."""
    if question == "resources":
        return ray.cluster_resources()
    return {("second" if n["Resources"].get(SECOND_NODE_RESOURCE) else "head"): n["NodeID"]
            for n in ray.nodes() if n["Alive"]}


class LocalCluster:
    """A head (``ray start --head``) and a second node (``ray start --address``) on 127.0.0.1.

    Args:
        base: folder for the nodes' logs; the temp dirs live in a short path under /tmp
            (Ray's Unix sockets have a ~100 character path limit).
        head_cpus, second_cpus: ``--num-cpus`` of each node.
        env: extra environment of both nodes (and of the drivers, see :meth:`env`).
        fast_health_check: :data:`FAST_HEALTH_CHECK` on the nodes (a lost node noticed sooner).
    """

    def __init__(self, base: Path, head_cpus: int = 2, second_cpus: int = 1, env: dict[str, str] | None = None,
                 fast_health_check: bool = True):
        self.base = Path(base)
        self.head_cpus, self.second_cpus = head_cpus, second_cpus
        self._tmp = Path(tempfile.mkdtemp(prefix="tprc-", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = _free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"  # also the job server
        token = secrets.token_hex(16)
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"},
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
            # Ray Train's placement-group cleaner asks the state API of the dashboard named here;
            # without it, it looks for the Ray instance started last on the machine (see init_ray)
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            # the worktree's code first, in the nodes and in every worker they start; `tpr` and `ray`
            # on the PATH of a job's entrypoint
            "PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x),
            "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
            **(FAST_HEALTH_CHECK if fast_health_check else {}),
            **(env or {}),
        }
        self.head: subprocess.Popen | None = None
        self.second: subprocess.Popen | None = None
        self._second_count = 0

    def env(self) -> dict[str, str]:
        """The environment of a driver of this cluster (``tpr train/sweep``): its address and token."""
        return {**self._env, "RAY_ADDRESS": self.address}

    def _ports(self) -> list[str]:
        names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        return [f"--{n}={_free_port()}" for n in names]

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.base / f"{name}.log", "w")  # noqa: SIM115 (the node outlives this call)
        cmd = [_RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={self._tmp / name}", *self._ports(), *args]
        # Its own session (process group): the node can be killed as a whole, alone.
        return subprocess.Popen(cmd, env=self._env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, timeout_s: float = 120) -> LocalCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        self.head = self._start("head", [
            "--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={_free_port()}",
        ])
        self.start_second(timeout_s)
        return self

    def start_second(self, timeout_s: float = 120) -> None:
        """Start (or start again, after a loss) the second node and wait until the cluster has it."""
        self._second_count += 1
        self.second = self._start(f"second-{self._second_count}", [
            f"--address={self.address}", f"--num-cpus={self.second_cpus}",
            f'--resources={{"{SECOND_NODE_RESOURCE}": 1}}',
        ])
        self.wait_resources({"CPU": self.head_cpus + self.second_cpus, SECOND_NODE_RESOURCE: 1}, timeout_s)

    def _ask(self, question: str, timeout_s: float) -> tuple[object | None, str]:
        """:func:`answer` from this process's Ray connection when it has one, else from a
        short-lived driver of the cluster (a few seconds: it starts a Python with Ray)."""
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            return answer(ray, question), ""
        import json

        probe = ("import json, os, ray\n"
                 "from tests.pipelines.local_cluster import answer\n"
                 "ray.init(address=os.environ['RAY_ADDRESS'], logging_level='ERROR', log_to_driver=False)\n"
                 f"print('OUT', json.dumps(answer(ray, {question!r})))")
        r = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True,
                           timeout=timeout_s)
        line = next((x for x in r.stdout.splitlines() if x.startswith("OUT ")), None)
        return (json.loads(line[4:]) if line else None), r.stderr[-2000:]

    def wait_resources(self, want: dict[str, float], timeout_s: float) -> None:
        """Wait until the cluster's alive nodes hold ``want``."""
        deadline = time.time() + timeout_s
        while True:
            have, err = self._ask("resources", timeout_s)
            if have is not None and all(have.get(k, 0) >= v for k, v in want.items()):
                return
            if time.time() > deadline or any(p is not None and p.poll() is not None for p in (self.head, self.second)):
                raise RuntimeError(f"cluster at {self.address} did not come up with {want}: see {self.base}/*.log\n"
                                   + err)
            time.sleep(0.5)

    def node_ids(self) -> dict[str, str]:
        """``{"head": id, "second": id}`` of the alive nodes (the second one: the custom resource's)."""
        nodes, err = self._ask("nodes", 60)
        if nodes is None:
            raise RuntimeError(f"cluster at {self.address} did not list its nodes: {err}")
        return nodes

    def kill_second(self) -> float:
        """SIGKILL every process of the second node, as when its machine is lost; returns the time
        of the kill. Ray starts each worker in its own process group (not the node's), so the
        node is its session: everything ``ray start`` left in it."""
        assert self.second is not None
        t = time.time()
        _kill_session(self.second.pid)
        _wait_exit(self.second)
        return t

    def stop(self) -> None:
        self._stop()
        import shutil

        shutil.rmtree(self._tmp, ignore_errors=True)

    def _stop(self) -> None:
        """End the sessions started here (the second node first): SIGTERM to each node's ``ray
        start``, then SIGKILL to whatever is left in its session (workers, agents)."""
        for proc in (self.second, self.head):
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            _wait_exit(proc, 3)
        for proc in (self.second, self.head):
            if proc is not None:
                _kill_session(proc.pid)
                _wait_exit(proc, 5)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
