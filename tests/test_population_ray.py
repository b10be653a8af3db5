"""The pool backend on Ray: the same pool workers as Ray actors, on a local Ray of two CPUs."""

from __future__ import annotations

import os

import pytest
import torch

import fednb
from tests.conftest import MLP, build, wait_until

ray = pytest.importorskip("ray", reason="the Ray backend is an optional extra: pip install 'fednb[ray]'")


def _ray_processes() -> list[int]:
    """This test run's Ray processes (raylet, GCS, workers) still running."""
    mark = f"FEDNB_TEST_RUN={os.environ['FEDNB_TEST_RUN']}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
            with open(f"/proc/{entry}/environ", "rb") as handle:
                ours = mark in handle.read().split(b"\0")
        except OSError:
            continue
        if ours and (b"raylet" in command or b"gcs_server" in command or b"ray::" in command
                     or b"default_worker.py" in command):
            found.append(int(entry))
    return found


def test_ray_actors_serve_the_population_with_the_results_of_the_pool():
    def trained(fed) -> list[torch.Tensor]:
        model = build()
        fed.train(model, MLP, rounds=2, lr=0.05, batch_size=16, parties_per_round=6, seed=5, evaluate_every=0)
        return [p.detach().clone() for p in model.parameters()]

    with fednb.simulate(40, dataset="digits", seed=2, backend="ray", workers=2) as fed:
        host = fed.simulation
        assert len(host.workers) == 2 and host.started_ray
        assert {row.status for row in fed.status()} == {"online"} and len(fed.parties) == 40
        assert all(w["endpoint"].startswith("ipc://") for w in host.workers)  # this machine: private ipc sockets
        on_ray = trained(fed)
    assert not ray.is_initialized()
    assert wait_until(lambda: not _ray_processes(), timeout=30), _ray_processes()
    with fednb.simulate(40, dataset="digits", seed=2, backend="pool", workers=2) as fed:
        on_pool = trained(fed)
    with fednb.simulate(40, dataset="digits", seed=2, backend="ray", workers=2, transport="tcp") as fed:
        assert all(w["endpoint"].startswith("tcp://127.0.0.1:") and w["public_key"] for w in fed.simulation.workers)
        over_tcp = trained(fed)  # under CURVE, as actors on a cluster are reached
    for a, b in zip(over_tcp, on_pool):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(on_ray, on_pool):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
