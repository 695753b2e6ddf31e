"""Multi-process runs on one machine: `lm train` processes with gloo collectives over simulated CPU devices.

Every run here is the real command line, the same code path a TPU pod or GPU cluster runs.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm import config as config_lib
from lm import distributed
from lm import metrics as metrics_lib
from lm import train as lm_train
from lm.errors import UserError

from conftest import REPO, TINY, tiny_config, write_conversations, write_experiment, write_pairs

STEPS = 6
CONFIG = {
  **TINY,
  "train.steps": STEPS,
  "train.eval_every": 3,
  "train.checkpoint_every": 3,
  "mesh.data": -1,
  "mesh.fsdp": 2,
  "data.shards": 2,
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(
  experiment, workdir, *args, processes: int = 1, devices: int = 4, env=None, command: str = "train"
) -> list[subprocess.Popen]:
  """Starts `lm train` (or `lm sweep`) as `processes` processes of `devices` simulated CPU devices each.

  Output goes to files, not pipes: a process blocked on a full pipe would stall its peers' collectives.
  """
  base = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  command = [sys.executable, "-m", "lm.cli", command, "--config", experiment, "--workdir", str(workdir)]
  command.append("--no-progress")
  port, procs = free_port(), []
  logs = Path(experiment).parent / "logs"
  logs.mkdir(exist_ok=True)
  for i in range(processes):
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
    out, err = (open(logs / f"{Path(workdir).name}.{len(list(logs.iterdir()))}.{k}", "w+") for k in ("out", "err"))
    proc = subprocess.Popen(
      [*command, *(flags if processes > 1 else []), *args],
      env={**base, **((env or {}).get(i, {}))},
      cwd=REPO,
      stdout=out,
      stderr=err,
    )
    proc.logs = (out, err)
    procs.append(proc)
  return procs


def finish(procs, timeout: float = 300) -> list[tuple[int, str, str]]:
  results = []
  for p in procs:
    p.wait(timeout=timeout)
    texts = []
    for f in p.logs:
      f.seek(0)
      texts.append(f.read())
      f.close()
    results.append((p.returncode, *texts))
  return results


def train(experiment, workdir, *args, processes: int = 1, devices: int = 4, command: str = "train") -> list[str]:
  """Runs to the end and returns each process's stdout."""
  results = finish(start(experiment, workdir, *args, processes=processes, devices=devices, command=command))
  for status, _, err in results:
    assert status == 0, err[-3000:]
  return [out for _, out, _ in results]


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def close(a: dict, b: dict, rtol: float) -> bool:
  return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in a)


@pytest.fixture
def experiment(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for d in range(16):
    (corpus / f"{d:02d}.txt").write_text("".join(f"def f{i}(x):\n    return x * {i} + {d}\n\n" for i in range(40)))
  return write_experiment(tmp_path / "tiny.py", **CONFIG, **{"data.source": f"text:{corpus}/*.txt"})


def test_two_processes_match_one_and_checkpoints_move_between_them(tmp_path, experiment):
  one, two = tmp_path / "one", tmp_path / "two"
  train(experiment, one, "--config.train.steps=3")  # 1 process x 4 devices
  train(experiment, two, "--config.train.steps=3", processes=2, devices=2)  # 2 processes x 2 devices
  assert sorted(losses(one)) == [1, 2, 3]
  assert close(losses(two), losses(one), 1e-6), (losses(two), losses(one))
  assert (two / "metrics.jsonl").read_text().count("\n") == (one / "metrics.jsonl").read_text().count("\n"), (
    "only process 0 writes metrics"
  )
  # Each run's checkpoint resumes under the other process count; both continue identically.
  train(experiment, one, processes=2, devices=2)
  train(experiment, two)
  assert sorted(losses(one)) == list(range(1, STEPS + 1))
  assert close(losses(two), losses(one), 1e-6), (losses(two), losses(one))
  assert (two / "plots").is_dir() and any((two / "tb").iterdir())


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_post_training_on_two_processes_matches_one_and_resumes_on_one(tmp_path, experiment, objective):
  post = {"data.post_source": write_conversations(tmp_path / "chats.jsonl", 200)}
  if objective == "dpo":  # from a language model of the same shape, trained in this process
    source_cfg = tiny_config(**{"data.source": config_lib.load_config(experiment).data.source, "train.steps": 2})
    source_cfg.data.cache_dir = str(tmp_path / "cache")
    lm_train.train(source_cfg, str(tmp_path / "source"), progress=False)
    post = {"data.post_source": write_pairs(tmp_path / "pairs.jsonl", 200), "train.objective": "dpo"}
    post.update({"train.init_from": str(tmp_path / "source"), "dpo.reference": "precomputed"})
  post["optim.schedule"] = "constant"  # so the 3-step run's schedule is the first 3 steps of the 6-step one's
  experiment = write_experiment(tmp_path / f"{objective}.py", **{**CONFIG, **post})
  one, two = tmp_path / "one", tmp_path / "two"
  train(experiment, one)  # 1 process x 4 devices
  train(experiment, two, "--config.train.steps=3", processes=2, devices=2)  # 2 processes x 2 devices
  train(experiment, two)  # resumed by 1 process: the data position (and reference log-probs) move with it
  assert sorted(losses(two)) == list(range(1, STEPS + 1))
  assert close(losses(two), losses(one), 1e-6), (losses(two), losses(one))
  evals = [[r["eval/loss"] for r in metrics_lib.read_metrics(str(d)) if "eval/loss" in r] for d in (one, two)]
  assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-6)


def test_a_sweep_across_two_processes_gives_the_results_of_one(tmp_path, experiment):
  sweep_file = tmp_path / "sweep.py"
  points = [{"id": "a", "train.steps": 2, "train.eval_every": 2}, {"id": "b", "train.steps": 2, "train.seed": 1}]
  sweep_file.write_text(f"{Path(experiment).read_text()}\n\ndef get_sweep():\n  return {points!r}\n")
  one, two = tmp_path / "one", tmp_path / "two"
  train(sweep_file, one, processes=1, devices=2, command="sweep")
  out0, out1 = train(sweep_file, two, processes=2, devices=1, command="sweep")
  assert "sweep: training a" in out0 and "sweep: training b" in out0
  assert "sweep:" not in out1, "only process 0 reports"
  rows = {d: {r["id"]: r for r in csv.DictReader((d / "results.csv").open())} for d in (one, two)}
  assert set(rows[two]) == {"a", "b"}
  for point in ("a", "b"):
    for key in ("loss", "best_eval_loss"):
      assert float(rows[two][point][key]) == pytest.approx(float(rows[one][point][key]), rel=1e-5), (point, key)
  assert rows[two]["a"]["loss"] != rows[two]["b"]["loss"]  # the seeds differ


def wait_for_step(workdir, step: int, procs, timeout: float = 240) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      raise AssertionError([(status, err[-3000:]) for status, _, err in finish(procs)])
    if (workdir / "metrics.jsonl").exists() and any(s >= step for s in losses(workdir)):
      return
    time.sleep(0.2)
  raise AssertionError(f"no step {step} within {timeout} s")


def test_a_signal_to_one_process_stops_every_process_at_the_same_checkpoint(tmp_path, experiment):
  workdir = tmp_path / "run"
  procs = start(
    experiment, workdir, "--config.train.steps=100000", "--config.train.checkpoint_every=100000", processes=2, devices=2
  )
  wait_for_step(workdir, 2, procs)
  procs[1].send_signal(signal.SIGTERM)
  (s0, out0, err0), (s1, out1, err1) = finish(procs, timeout=120)
  assert (s0, s1) == (0, 0), (err0[-2000:], err1[-2000:])
  assert "stopped by a signal to another process after step" in out0, out0
  assert "stopped by" not in out1 and "lm:" not in err1, "only process 0 reports (gloo's own lines aside)"
  stopped_at = int(out0.split("after step ")[1].split(":")[0])
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [stopped_at]
  assert max(losses(workdir)) == stopped_at


def test_an_error_in_one_process_stops_the_others_promptly(tmp_path, experiment):
  procs = start(experiment, tmp_path / "run", processes=2, devices=2, env={1: {"LM_DEBUG_FAIL_STEP": "2"}})
  t0 = time.monotonic()
  (s0, _, err0), (s1, _, err1) = finish(procs, timeout=240)
  assert s1 == 1 and "lm: error: process 1: injected failure at step 2" in err1, err1[-2000:]
  assert s0 == 1 and "lm: error: process 0: stopping because process 1 failed: injected failure" in err0, err0[-2000:]
  assert time.monotonic() - t0 < 180


@pytest.mark.parametrize(
  "process_id, expected",
  [
    (1, "process 1 of 2: cannot reach the coordinator at 127.0.0.1:"),
    (0, "process 0 of 2: not all 2 processes joined the run at 127.0.0.1:"),
  ],
)
def test_a_missing_peer_is_a_one_line_error_within_the_timeout(tmp_path, experiment, process_id, expected):
  port = free_port()
  flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id)]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "lm.cli", "train", "--config", experiment, "--workdir", str(tmp_path / "run")]
  t0 = time.monotonic()
  out = subprocess.run([*command, *flags, "--dist-timeout", "4"], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("lm: ")]
  assert len(lines) == 1 and lines[0].startswith(f"lm: error: {expected}"), out.stderr[-2000:]
  assert time.monotonic() - t0 < 60
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"coordinator": "127.0.0.1:1234", "num_processes": 2}, "needs --process-id too"),
    ({"coordinator": "localhost", "num_processes": 2, "process_id": 0}, "must be HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"--process-id must be in \[0, 1\]"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, "at least 1"),
  ],
)
def test_bad_distributed_settings_are_user_errors(kwargs, message):
  with pytest.raises(UserError, match=message):
    distributed.initialize(**kwargs)


def test_settings_come_from_the_environment_too(monkeypatch):
  monkeypatch.setenv("LM_NUM_PROCESSES", "two")
  with pytest.raises(UserError, match=r"\$LM_NUM_PROCESSES must be int"):
    distributed.initialize()
  monkeypatch.setenv("LM_NUM_PROCESSES", "1")
  distributed.initialize()  # one process: nothing to start
  assert not distributed.active()
