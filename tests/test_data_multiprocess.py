"""Two real JAX processes (jax.distributed on 127.0.0.1): disjoint per-process shares that cover
the data, and per-host batches that assemble into one global batch on a 2-process mesh."""

import json
import os
import socket
import subprocess
import sys

import pytest

N_PAIRS, N_RW, BATCH = 21, 18, 4  # 21 pairs over 2 processes: 10 each, 1 left over (counted)


def _records_file(path: str) -> None:
  with open(path, "w") as f:
    for i in range(N_PAIRS):
      f.write(json.dumps({"id": f"pair-{i}", "prompt": f"request {i}", "prefix": "",
                          "chosen": f"No, {i}.", "rejected": f"Yes, {i}."}) + "\n")
  with open(path.replace("pairs", "rw"), "w") as f:
    for i in range(N_RW):
      f.write(json.dumps({"id": f"rw-{i}", "prompt": f"question {i} " + "x " * i,
                          "reasoning": f"think {i}", "response": f"answer {i}"}) + "\n")


def worker(coordinator: str, process_id: int, data: str, out: str) -> None:
  import jax
  import numpy as np
  import transformers
  from jax.experimental import multihost_utils

  from saro_jax import sharding
  from saro_jax.data import bundled, pipeline

  jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
  tok = transformers.AutoTokenizer.from_pretrained(bundled.path("tokenizer"))
  # process_index / process_count come from jax.distributed.
  pairs = pipeline.dpo_batches(data, tok, batch_size=BATCH, max_length=64, seed=7, num_epochs=1)
  ids = [int(i) for b in pairs for i in b["example_id"] if i >= 0]
  sft = pipeline.sft_batches(data.replace("pairs", "rw"), tok, batch_size=BATCH, max_length=128,
                             seed=7, num_epochs=1, pack=False)
  segments = []
  for b in sft:
    segments += [b["tokens"][r, b["segment_ids"][r] > 0].tolist() for r in range(len(b["tokens"]))
                 if b["segment_ids"][r].any()]
  # One global batch from the two host batches, on a mesh spanning both processes.
  mesh = sharding.make_mesh(data=-1)
  local = next(pipeline.sft_batches(data.replace("pairs", "rw"), tok, batch_size=BATCH,
                                    max_length=128, seed=7))
  glob = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local["tokens"])
  total = int(jax.jit(lambda x: x.sum())(glob))  # a cross-process reduction
  local_sums = multihost_utils.process_allgather(np.asarray(local["tokens"].sum(), np.int32))
  with open(out, "w") as f:
    json.dump({"index": jax.process_index(), "count": jax.process_count(), "ids": ids,
               "segments": segments, "global_shape": list(glob.shape), "global_sum": total,
               "local_sums": np.asarray(local_sums).tolist(),
               "stats": pairs.stats.as_dict()}, f)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_read_disjoint_covering_shares(tmp_path):
  from saro_jax.data import batching

  data = str(tmp_path / "pairs.jsonl")
  _records_file(data)
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 "
             + os.environ["SARO_TEST_XLA_FLAGS"], JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                         os.environ.get("PYTHONPATH", "")]))
  outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, __file__, coordinator, str(i), data, outs[i]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  res = [json.load(open(o)) for o in outs]
  assert [r["index"] for r in res] == [0, 1] and all(r["count"] == 2 for r in res)
  a, b = (set(r["ids"]) for r in res)
  assert len(a) == len(res[0]["ids"]) == 10 and len(b) == len(res[1]["ids"]) == 10
  assert not a & b
  everything = {batching.example_id(f"pair-{i}") for i in range(N_PAIRS)}
  assert a | b <= everything and len(everything - (a | b)) == 1
  assert all(r["stats"]["dropped/process_remainder"] == 1 for r in res)
  sa, sb = ({tuple(s) for s in r["segments"]} for r in res)
  assert len(sa) == len(sb) == N_RW // 2 and not sa & sb
  assert all(r["global_shape"] == [BATCH, 128] for r in res)
  assert res[0]["global_sum"] == res[1]["global_sum"] == sum(res[0]["local_sums"])


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
