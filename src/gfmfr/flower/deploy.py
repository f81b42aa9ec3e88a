"""A Flower deployment on this machine: a SuperLink, N SuperNodes and the app submitted with ``flwr run``.

The same processes a deployment across machines runs (docs/flower.md), on 127.0.0.1 without TLS:
for trying a deployment, for the tests that check it gives the in-process numbers, and for
``benchmarks/flower_overhead.py``. Each process logs to a file of its own in the deployment's folder
and is stopped by its process group (it and the processes it started) when the deployment ends.
With ``workers``, each SuperNode runs with ``--isolation process`` and one ``gfmfr node-worker``
runs its ClientApp tasks (:mod:`gfmfr.flower.worker`), instead of a process per message.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gfmfr.flower import FLOWER_ENV

PROJECT = Path(__file__).resolve().parents[3]
"""The project root, whose ``pyproject.toml`` carries the Flower app (``flwr run`` submits it)."""


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, seconds: float) -> None:
    """Wait until something listens on ``port`` (a TimeoutError after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {seconds} s")


class LocalDeployment:
    """A SuperLink and ``nodes`` SuperNodes in ``folder`` (a context manager: every process is stopped
    on exit). :meth:`submit` runs a configuration on them; :meth:`stop` and :meth:`node` kill and start
    a node, as a crash and a restart."""

    def __init__(self, folder: Path, nodes: int, workers: bool = False):
        self.folder, self.nodes, self.workers = Path(folder), nodes, workers
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, **FLOWER_ENV, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.link = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started = time.monotonic()

    def __enter__(self) -> LocalDeployment:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.link)])
        wait_for_port(self.link, 60)
        for p in range(self.nodes):
            self.node(p)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.procs):
            self.stop(name)

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``args`` (a command of the venv's ``bin``) as ``name``, logging to ``name.log``."""
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - the process writes it until stopped
        self.procs[name] = subprocess.Popen(
            [str(self.bin / args[0]), *args[1:]],
            env={**self.env, "FLWR_HOME": str(self.folder / f"home-{name}")},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
        return self.procs[name]

    def stop(self, name: str) -> None:
        """Kill process ``name`` and the processes it started (its process group)."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def node(self, p: int) -> None:
        """Start the SuperNode of partition ``p`` (and its worker, with ``workers``)."""
        port = free_port()
        state = self.folder / "state" / f"node-{p}"
        args = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link}"]
        args += ["--host", "127.0.0.1", "--port", str(port)]
        args += ["--node-config", f'partition-id={p} num-partitions={self.nodes} state-dir="{state}"']
        self.start(f"node{p}", [*args, *(["--isolation", "process"] if self.workers else [])])
        if self.workers:
            if f"worker{p}" in self.procs:  # a restarted node gets a new worker, as a restarted machine would
                self.stop(f"worker{p}")
            worker = ["gfmfr", "node-worker", "--runtime-api-address", f"127.0.0.1:{port}", "--insecure"]
            self.start(f"worker{p}", worker)

    def submit(self, run_toml: Path, out: Path, timeout: float = 30.0) -> subprocess.Popen[bytes]:
        """``flwr run`` of the configuration in ``run_toml``, writing ``out/results.json``."""
        home = self.folder / "home-flwr-run"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.link}"\ninsecure = true\n'
        )
        run_config = f'config-file="{run_toml}" out="{out}" timeout={timeout:g}'
        args = ["flwr", "run", str(PROJECT), "local", "--run-config", run_config, "--stream"]
        return self.start("flwr-run", args, cwd=PROJECT)

    def results(self, out: Path, seconds: float) -> dict[str, Any]:
        """Wait for ``out/results.json`` (a RuntimeError with the run's log if ``flwr run`` failed or
        ``seconds`` passed)."""
        while not (out / "results.json").exists():
            run = self.procs.get("flwr-run")
            failed = run is not None and run.poll() not in (None, 0)
            if failed or time.monotonic() - self.started > seconds:
                log = (self.folder / "flwr-run.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the deployed run {'failed' if failed else 'timed out'}:\n{log}")
            time.sleep(0.2)
        return dict(json.loads((out / "results.json").read_text()))
