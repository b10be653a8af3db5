"""The pool backend on Ray: ``simulate(n, backend="ray")`` runs the pool's workers as Ray actors.

Each actor builds the same population the pool host builds (from the bundled dataset and the
seed: every actor derives it alike) and serves its share of the parties on one shared endpoint
(:mod:`fednb.party.population_server`), exactly as a forked pool worker does. So a simulation
grows past one machine on an existing Ray cluster (``ray_address=``) with the same party code.

Ray carries only an actor's start-up settings (one JSON string) and its endpoint back (another).
Every request, update and reply travels over fednb's own wire: ZeroMQ frames with a validated
JSON header and raw tensor buffers. Actors on this machine listen on ipc sockets in the
simulation's private 0700 directory; on a cluster (``ray_address``) they listen on TCP, always
under CURVE, with the coordinator's key the only one authorized.

Ray is an optional extra: ``pip install fednb[ray]``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednb.errors import FederationError

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray: pip install 'fednb[ray]'") from None
    return ray


class PoolActor:
    """One pool worker inside a Ray actor: its population share, served on a thread of the actor."""

    def __init__(self, settings: str) -> None:
        import argparse
        import os

        import torch

        from fednb.party.host import population
        from fednb.party.population_server import PopulationServer
        from fednb.transport import AllowList, generate

        config = json.loads(settings)
        args = argparse.Namespace(**config["population"])
        torch.set_num_threads(max(1, int(config["threads"])))
        shard = population(args).shard(config["index"], config["count"])
        authorized = config["authorized"]
        self._keypair = generate() if authorized else None
        allow = AllowList(keys={authorized.encode(): "coordinator"}) if authorized else None
        name = f"pool-{config['index']}"
        # what its parties keep between rounds (SCAFFOLD's c_i), on the actor's own node: removed at stop
        self._directory = tempfile.mkdtemp(prefix="fednb-pool-")
        # a cluster's actors listen on every interface (the coordinator may be on another node); on this
        # machine, on loopback; both under CURVE, with the coordinator's key the only one authorized
        endpoint = f"tcp://{config['tcp']}:*" if config["tcp"] else f"ipc://{config['dir']}/{name}.sock"
        self._server = PopulationServer(name, endpoint, shard, keypair=self._keypair, allow=allow,
                                        heartbeat=config["heartbeat"], timeout=config["timeout"],
                                        members=config["members"],
                                        require_secure_aggregation=config["require_secure_aggregation"],
                                        directory=self._directory)
        self._parties = list(shard.parties)
        self._pid = os.getpid()
        self._ready = threading.Event()
        self._endpoint = ""
        self._thread = threading.Thread(target=self._serve, name=f"fednb-{name}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        def on_ready(endpoint: str) -> None:
            self._endpoint = endpoint
            self._ready.set()

        try:
            self._server.serve_forever(on_ready)
        finally:
            self._ready.set()

    def ready(self, timeout: float) -> str:
        """The worker's entry as the pool host reports it (JSON), once it listens."""
        if not self._ready.wait(timeout) or not self._endpoint:
            raise RuntimeError(f"the pool worker did not start listening within {timeout:.0f} s")
        endpoint = self._endpoint
        if endpoint.startswith("tcp://0.0.0.0:"):
            ray = _ray()
            endpoint = f"tcp://{ray.util.get_node_ip_address()}:{endpoint.rsplit(':', 1)[1]}"
        return json.dumps({"name": self._server.name, "endpoint": endpoint, "pid": self._pid,
                           "public_key": self._keypair.public.decode() if self._keypair else None,
                           "parties": self._parties})

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(5.0)
        shutil.rmtree(self._directory, ignore_errors=True)


@dataclass(eq=False)
class RayHost:
    """The actors of a Ray simulation (and the local Ray it started, if it did), stopped together."""

    directory: Path
    actors: list[Any]
    started_ray: bool
    workers: list[dict[str, Any]] = field(default_factory=list)
    parties: list[dict[str, Any]] = field(default_factory=list)
    ready_seconds: float = 0.0
    _stopped: bool = False

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        ray = _ray()
        try:
            try:
                ray.get([actor.stop.remote() for actor in self.actors], timeout=grace)
            except Exception as exc:  # noqa: BLE001 - a dead or stuck actor is killed below either way
                log.warning("a Ray pool worker did not stop cleanly: %s", exc)
            for actor in self.actors:
                ray.kill(actor)
        finally:
            if self.started_ray:
                ray.shutdown()
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [int(w["pid"]) for w in self.workers]


def start_ray(n: int | None, *, dataset: str, partition: str, alpha: float, shards_per_party: int, seed: int,
              test_fraction: float, authorized: bytes | None, heartbeat: float, heartbeat_timeout: float, tcp: bool,
              require_secure_aggregation: bool, timeout: float, workers: int, examples_per_party: int | None,
              members: int, address: str | None) -> RayHost:
    """Start ``workers`` pool actors on Ray (joining ``address``, or a local Ray) and wait until they listen."""
    ray = _ray()
    remote_cluster = address is not None
    if remote_cluster and authorized is None:
        raise ValueError("actors on a Ray cluster listen on TCP, always under CURVE: secure=True is implied")
    tcp = tcp or remote_cluster
    started_ray = False
    directory = Path(tempfile.mkdtemp(prefix="fednb-ray-"))  # mode 0700: the ipc sockets' privacy
    started = time.monotonic()
    if not ray.is_initialized():
        try:
            if remote_cluster:
                ray.init(address=address, log_to_driver=False)
            else:  # its session files (sockets, logs) go with the simulation's directory
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         _temp_dir=str(directory / "ray"))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        started_ray = True
    actor_class = ray.remote(num_cpus=1)(PoolActor)
    count = min(workers, int(n or 1))
    population = {"dataset": dataset, "n": n, "partition": partition, "alpha": alpha, "shards": shards_per_party,
                  "seed": seed, "test_fraction": test_fraction, "examples_per_party": examples_per_party or 0}
    actors: list[Any] = []
    host = RayHost(directory, actors, started_ray)
    try:
        for index in range(count):
            settings = {"population": population, "index": index, "count": count, "dir": str(directory),
                        "tcp": ("0.0.0.0" if remote_cluster else "127.0.0.1") if tcp else "",
                        "authorized": authorized.decode() if authorized else None, "threads": 1,
                        "heartbeat": heartbeat, "timeout": heartbeat_timeout, "members": members,
                        "require_secure_aggregation": require_secure_aggregation}
            actors.append(actor_class.remote(json.dumps(settings)))
        try:
            entries = ray.get([actor.ready.remote(timeout) for actor in actors], timeout=timeout + 30)
        except Exception as exc:  # noqa: BLE001 - Ray raises its own types for a failed or slow actor
            raise FederationError(f"the Ray pool workers did not start: {exc}") from exc
        host.workers = [json.loads(entry) for entry in entries]
        host.ready_seconds = time.monotonic() - started
    except BaseException:
        host.stop()
        raise
    return host
