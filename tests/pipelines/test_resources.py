"""The resource check of the preflight: a run whose workers cannot all start on the known
cluster is refused before Ray starts (no Ray is started here)."""

import os

import pytest

from pipelines.setup import PreflightError, check_resources
from tpr_core.experiment import config_from_dict


def _cfg(**distributed):
    return config_from_dict({"method": "irra", "data": {"batch_size": 4096}, "distributed": distributed})


def test_more_cpus_than_this_machine_has_is_refused(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    check_resources(_cfg(num_workers=1, cpus_per_worker=1))  # fits anywhere
    with pytest.raises(PreflightError, match=rf"distributed.num_workers 4096 x distributed.cpus_per_worker 1 = "
                       rf"4096 CPUs, but this machine has {cpus}"):
        check_resources(_cfg(num_workers=4096, cpus_per_worker=1))


def test_gpus_this_machine_lacks_are_refused(monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    n = torch.cuda.device_count() + 1
    with pytest.raises(PreflightError, match=rf"distributed.num_workers {n} with distributed.use_gpu=true needs {n} GPUs"):
        check_resources(_cfg(num_workers=n, cpus_per_worker=0.001, use_gpu=True))


def test_a_remote_cluster_is_not_judged(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # may autoscale: Ray Train waits for it
    check_resources(_cfg(num_workers=4096, cpus_per_worker=1))
