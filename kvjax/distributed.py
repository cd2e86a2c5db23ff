"""Several processes, one program: JAX's own distributed runtime, started the same way on one
machine as on many hosts.

Each process runs the same script. `initialize()` (first thing, before any other JAX call)
joins the processes through `jax.distributed.initialize`, reading where the coordinator is and
which process this is from the environment (`KVJAX_COORDINATOR`, `KVJAX_NUM_PROCESSES`,
`KVJAX_PROCESS_ID`), or from its arguments. After it, `jax.devices()` lists every process's
devices, a mesh over them spans the processes, and collectives between processes run over JAX's
CPU collectives (gloo) or the accelerator interconnect. Nothing else is needed: the sharded
models (`kvjax.models.shard`) place their arrays on such a mesh as on one process's.

`launch` (also `python -m kvjax.distributed`) starts N local processes of a script with those
variables set, each with `--local-devices` CPU devices, and waits for all of them: the way to
run a multi-host program on one machine.

    python -m kvjax.distributed --processes 2 --local-devices 4 -- my_script.py --flag
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from typing import Sequence

ENV_COORDINATOR = "KVJAX_COORDINATOR"
ENV_NUM_PROCESSES = "KVJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KVJAX_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
  """Joins this process to the others (`jax.distributed.initialize`); returns (process_id,
  num_processes). Arguments default to the KVJAX_* environment variables `launch` sets; with
  neither, this is a single process and nothing is initialized."""
  env = os.environ
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = _int_env(ENV_NUM_PROCESSES)
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = _int_env(ENV_PROCESS_ID)
  if coordinator_address is None and num_processes is None and process_id is None:
    return 0, 1
  if coordinator_address is None or num_processes is None or process_id is None:
    raise ValueError("initialize needs coordinator_address, num_processes and process_id (or "
                     f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                     f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
  if not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
  if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
  import jax
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return process_id, num_processes


def _int_env(name: str) -> int:
  try:
    return int(os.environ[name])
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(argv: Sequence[str], *, processes: int, local_devices: int | None = None,
           port: int | None = None, timeout: float | None = None,
           env: dict | None = None) -> list[int]:
  """Runs `python argv...` as `processes` local processes of one distributed program.

  Args:
    argv: the script and its arguments (each process gets the same).
    processes: number of processes.
    local_devices: CPU devices per process (XLA's forced host device count); None leaves the
      platform as it is (e.g. one accelerator per process).
    port: the coordinator's port on localhost (default: a free one).
    timeout: seconds before every process is killed (None: no limit).
    env: extra environment variables.
  Returns the exit codes, by process id. If one process fails, the others are stopped (a
  collective would otherwise wait for it forever).
  """
  if not isinstance(processes, int) or processes < 1:
    raise ValueError(f"processes must be a positive int, got {processes!r}")
  if local_devices is not None and (not isinstance(local_devices, int) or local_devices < 1):
    raise ValueError(f"local_devices must be a positive int or None, got {local_devices!r}")
  if not argv:
    raise ValueError("argv must name the script to run")
  address = f"localhost:{port or free_port()}"
  procs = []
  for i in range(processes):
    e = dict(os.environ, **(env or {}))
    e.update({ENV_COORDINATOR: address, ENV_NUM_PROCESSES: str(processes),
              ENV_PROCESS_ID: str(i)})
    if local_devices is not None:
      flags = [f for f in e.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
      e["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={local_devices}"])
      e.setdefault("JAX_PLATFORMS", "cpu")
    procs.append(subprocess.Popen([sys.executable, *argv], env=e))
  deadline = None if timeout is None else time.monotonic() + timeout
  codes: list[int | None] = [None] * processes
  try:
    while any(c is None for c in codes):
      for i, p in enumerate(procs):
        if codes[i] is None:
          codes[i] = p.poll()
      if any(c not in (None, 0) for c in codes) or (deadline and time.monotonic() > deadline):
        break
      time.sleep(0.1)
  finally:
    for i, p in enumerate(procs):
      if p.poll() is None:
        p.kill()
      codes[i] = p.wait()
  return [int(c) for c in codes]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m kvjax.distributed",
                              description="Run a script as several local processes of one JAX "
                                          "distributed program.")
  p.add_argument("--processes", type=int, required=True)
  p.add_argument("--local-devices", type=int, default=None,
                 help="CPU devices per process (default: the platform's own)")
  p.add_argument("--port", type=int, default=None)
  p.add_argument("--timeout", type=float, default=None, help="seconds")
  p.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
  a = p.parse_args(argv)
  script = a.script[1:] if a.script[:1] == ["--"] else a.script
  if not script:
    p.error("give the script to run after --")
  if a.processes < 1 or (a.local_devices is not None and a.local_devices < 1):
    p.error("--processes and --local-devices must be positive")
  codes = launch(script, processes=a.processes, local_devices=a.local_devices, port=a.port,
                 timeout=a.timeout)
  for i, c in enumerate(codes):
    if c:
      print(f"process {i} exited with {c}", file=sys.stderr)
  return max(codes, key=lambda c: c != 0)


if __name__ == "__main__":
  sys.exit(main())
