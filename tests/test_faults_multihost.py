"""SIGTERM to one host of two (BUILD.md "Failure behaviour"): real jax.distributed processes on
127.0.0.1 stop at the same step through JAX's preemption sync point."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fault_runs import ENV, ROOT, TINY, metric_steps, steps_on_disk
from saro_jax import train


@pytest.mark.multiprocess
@pytest.mark.heavy
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """Real jax.distributed over 127.0.0.1: SIGTERM reaches process 1 only; JAX's preemption sync
  point makes both stop after the same step, which both checkpoint (each its data position)."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  workdir = tmp_path / "run"
  steps = 60
  procs, logs = [], []
  for i in range(2):
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               + os.environ["SARO_TEST_XLA_FLAGS"],
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))
    cmd = [sys.executable, "-m", "saro_jax.main", "--multihost", "--config", "configs/rw.py",
           f"--workdir={workdir}", *TINY, f"--config.train.steps={steps}", "--config.checkpoint.every=0"]
    log = open(tmp_path / f"process_{i}.log", "w")
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  deadline = time.time() + 600
  while not metric_steps(workdir) and procs[0].poll() is None and time.time() < deadline:
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=300) for p in procs]
  for log in logs:
    log.close()
  texts = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
  assert codes == [train.PREEMPTED_EXIT_CODE] * 2, [t[-3000:] for t in texts]
  reached = [int(t.split("preempted at step ")[1].split()[0]) for t in texts]
  print(f"SIGTERM to process 1: both stopped at step {reached}")
  assert reached[0] == reached[1] < steps
  assert steps_on_disk(workdir) == [reached[0]]
  for i in range(2):
    assert os.path.isfile(workdir / "checkpoints" / "data_state" / f"{reached[0]}.process_{i}.json")
