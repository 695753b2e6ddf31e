"""Exact resume after SIGKILL (including mid-save) and SIGTERM, run as real `lm train` processes; elastic restore."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm import checkpoint as checkpoint_lib
from lm import loop, partitioning, train
from lm import metrics as metrics_lib
from lm import state as state_lib
from lm import tokenizer as tokenizer_lib
from lm import workdir as workdir_lib
from lm.worlds import instructions

from conftest import REPO, run_devices_script, tiny_config, write_conversations, write_pairs

EXPERIMENT = """
from lm.config import default_config

def get_config():
  c = default_config()
  c.data.source = "text:{root}/corpus.txt"
  c.data.cache_dir = "{root}/cache"
  c.data.seq_len = 32
  c.tokenizer.kind = "byte"
  c.model.d_model = 32
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 64
  c.train.batch_size = 8
  c.train.steps = 12
  c.train.eval_every = 100  # evaluates at the last step only
  c.train.eval_batches = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  c.optim.schedule = "constant"  # so more steps leave the first 12 as they were
  c.optim.warmup_steps = 2
  c.mesh.data = 1
{extra}
  return c
"""

# Post-training runs of the same model, added to EXPERIMENT (DPO starts from a 4-step run of it, "source").
POST_TRAINING = {
  "sft": ['c.data.post_source = "jsonl:{root}/chats.jsonl"'],
  "dpo": [
    'c.data.post_source = "jsonl:{root}/pairs.jsonl"',
    'c.train.objective = "dpo"',
    'c.train.init_from = "{root}/source"',
    'c.dpo.reference = "precomputed"',
  ],
}
RL = [  # rollouts at steps 1 and 7: checkpoints 4 and 8 fall inside a rollout, 12 at its end
  'c.data.post_source = "jsonl:{root}/world/prompts_train.jsonl"',
  'c.data.post_eval_source = "jsonl:{root}/world/eval.jsonl"',
  "c.data.seq_len = 96",
  'c.train.init_from = "{root}/source"',
  'c.rl.reward_fn = "conftest:length_reward"',
  "c.rl.max_new_tokens = 16",
  "c.rl.num_minibatches = 2",
  "c.rl.ppo_epochs = 3",
  "c.rl.eval_prompts = 8",
]
POST_TRAINING["ppo"] = [*RL, 'c.train.objective = "ppo"']
POST_TRAINING["grpo"] = [*RL, 'c.train.objective = "grpo"', "c.rl.group_size = 4"]

# `lm train` with each logged row followed by a pause, so that a signal lands mid-run, and optionally
# with the commit of one checkpoint step held back, so that a kill lands during its asynchronous save.
SLOWED = """
import asyncio, sys, time
from lm import metrics

pause, held_step = float(sys.argv[1]), sys.argv[2]
write = metrics.MetricsWriter.write

def slow_write(self, *args):
  write(self, *args)
  time.sleep(pause)

metrics.MetricsWriter.write = slow_write
if held_step:
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held_finalize(self):
    if self.get_final().name == held_step:
      await asyncio.sleep(600)
    await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = held_finalize

from lm.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i % 13}\n" for i in range(3000)))
  (root / "exp.py").write_text(EXPERIMENT.format(root=root, extra=""))
  for objective, lines in POST_TRAINING.items():
    extra = "\n".join(f"  {line}" for line in lines).format(root=root)
    (root / f"{objective}.py").write_text(EXPERIMENT.format(root=root, extra=extra))
  write_conversations(root / "chats.jsonl", 300)
  write_pairs(root / "pairs.jsonl", 200)
  instructions.write_world(root / "world", seed=0, n_train=10, n_eval=20, n_pairs=10, n_pretrain=5, n_prompts=100)
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(REPO, "tests"), env.get("PYTHONPATH")]))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # later processes reuse the first one's executables
  return root, env


def lm_train(experiment, workdir, *extra, slowed=None, config="exp"):
  """Starts `lm train` on the experiment (or on `config`.py beside it); `slowed=(pause, held_step)` runs it
  through SLOWED."""
  root, env = experiment
  args = ["train", "--config", str(root / f"{config}.py"), "--workdir", str(workdir), "--no-progress", *extra]
  prefix = ["-c", SLOWED, str(slowed[0]), slowed[1]] if slowed else ["-m", "lm.cli"]
  return subprocess.Popen(
    [sys.executable, *prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
  )


def finish(proc) -> str:
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  return out


def signal_when(proc, ready, sig):
  """Sends `sig` to `proc` once `ready()`; returns (returncode, stdout, stderr)."""
  deadline = time.time() + 240
  while not ready():
    assert proc.poll() is None, proc.communicate()  # it must not end before the signal
    assert time.time() < deadline
    time.sleep(0.01)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=240)
  return proc.returncode, out, err


def logged(workdir, step):
  """A test that this process has logged `step`: its resume rewrote metrics.jsonl (a new inode) first."""
  path = workdir / "metrics.jsonl"
  before = path.stat().st_ino if path.exists() else None

  def ready():
    if not path.exists() or path.stat().st_ino == before:
      return False
    return max((r["step"] for r in metrics_lib.read_metrics(str(workdir))), default=0) >= step

  return ready


def test_killed_and_preempted_runs_resume_to_the_uninterrupted_losses(experiment, tmp_path):
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  finish(lm_train(experiment, reference))
  expected = {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(reference))}
  assert sorted(expected) == list(range(1, 13))
  checkpoints = workdir / "checkpoints"

  # 1. SIGKILL before the first checkpoint: the rerun starts afresh.
  code, _, err = signal_when(lm_train(experiment, workdir, slowed=(0.2, "")), logged(workdir, 2), signal.SIGKILL)
  assert code == -signal.SIGKILL, err

  # 2. SIGKILL while checkpoint 8 is being written: its temporary directory is never committed.
  proc = lm_train(experiment, workdir, slowed=(0.05, "8"))
  code, _, err = signal_when(proc, lambda: (checkpoints / "8.orbax-checkpoint-tmp").exists(), signal.SIGKILL)
  assert code == -signal.SIGKILL, err
  assert (checkpoints / "4").is_dir() and not (checkpoints / "8").exists()

  # 3. SIGTERM: the step finishes, its checkpoint commits, exit 0. The uncommitted save is cleaned up.
  proc = lm_train(experiment, workdir, slowed=(0.2, ""))
  code, out, err = signal_when(proc, logged(workdir, 6), signal.SIGTERM)
  assert code == 0, err
  assert "stopped by SIGTERM after step" in out and "rerun the same command to resume" in out, out
  stopped = int(out.split("after step ")[1].split(":")[0])
  assert 6 <= stopped < 12 and (checkpoints / str(stopped) / "commit_success.txt").exists()
  assert not (checkpoints / "8.orbax-checkpoint-tmp").exists()

  # 4. SIGKILL between checkpoints; a writer killed mid-row would also leave half a line, as added here.
  code, _, err = signal_when(lm_train(experiment, workdir, slowed=(0.2, "")), logged(workdir, 10), signal.SIGKILL)
  assert code == -signal.SIGKILL, err
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "tok')

  # The same command runs to the end, here with more steps and other intervals: changes a resumed run may make.
  allowed_changes = ("--config.train.steps=14", "--config.train.eval_every=7", "--config.train.checkpoint_every=3")
  finish(lm_train(experiment, workdir, *allowed_changes))
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in rows] == list(range(1, 15))  # every step exactly once
  assert {r["step"]: r["train/loss"] for r in rows if r["step"] <= 12} == expected  # bitwise: == on floats
  # The state at step 12, RNG key included, is the uninterrupted run's bit for bit (its schedule clock aside:
  # a resume with 14 steps set it for 14).
  resumed, uninterrupted = state_at(workdir, 12), state_at(reference, 12)
  assert int(resumed.step) == 12
  for name in ("rng", "params", "opt_state", "skipped_steps"):
    leaves = jax.tree.leaves((getattr(resumed, name), getattr(uninterrupted, name)))
    half = len(leaves) // 2
    assert all(np.array_equal(x, y) for x, y in zip(leaves[:half], leaves[half:], strict=True)), name


@pytest.mark.parametrize("objective", POST_TRAINING)
def test_a_killed_post_training_run_resumes_to_the_uninterrupted_losses(experiment, tmp_path, objective):
  root, _ = experiment
  if objective in ("dpo", "ppo", "grpo") and not (root / "source").exists():
    finish(lm_train(experiment, root / "source", "--config.train.steps=4"))
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  finish(lm_train(experiment, reference, config=objective))
  expected = {r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(str(reference))}
  assert sorted(expected) == list(range(1, 13))

  proc = lm_train(experiment, workdir, slowed=(0.2, ""), config=objective)
  code, _, err = signal_when(proc, logged(workdir, 6), signal.SIGKILL)
  assert code == -signal.SIGKILL, err
  finish(lm_train(experiment, workdir, config=objective))
  rows = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in rows] == list(range(1, 13))
  assert {r["step"]: r["train/loss"] for r in rows} == expected  # bitwise: the data and its reference log-probs
  last = metrics_lib.read_metrics(str(reference))[-1]
  evaluated = "eval/reward" if objective in ("ppo", "grpo") else "eval/loss"
  assert rows[-1][evaluated] == last[evaluated]
  if objective in ("ppo", "grpo"):  # the rollouts too: rewards, KL and advantages' effect on the loss
    for key in ("rl/reward", "rl/kl", "rl/response_length", "train/policy_loss"):
      assert [r[key] for r in rows] == [r[key] for r in metrics_lib.read_metrics(str(reference))], key
  resumed, uninterrupted = state_at(workdir, 12), state_at(reference, 12)
  for name in ("rng", "params", "opt_state", "frozen"):
    leaves = jax.tree.leaves((getattr(resumed, name), getattr(uninterrupted, name)))
    half = len(leaves) // 2
    assert all(np.array_equal(x, y) for x, y in zip(leaves[:half], leaves[half:], strict=True)), name


def state_at(workdir, step: int):
  """Checkpoint `step` of the run in `workdir`, restored on host."""
  cfg, tok = workdir_lib.load_run(str(workdir))
  setup = state_lib.build(cfg, tok.vocab_size, partitioning.make_mesh(cfg))
  ckpt = checkpoint_lib.Checkpointer(str(workdir))
  with setup.context():
    state, _, _ = ckpt.restore(step, setup.abstract_state)
  ckpt.close()
  return jax.device_get(state)


def test_the_first_signal_stops_gracefully_and_the_second_falls_through():
  stop = loop.StopFlag()
  previous = signal.getsignal(signal.SIGINT)
  stop.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signal == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is previous  # a second Ctrl-C interrupts at once
  finally:
    stop.restore()


def shard_shapes(result: dict) -> set:
  return {tuple(shape) for shape in result["shards"].values()}


def digest(cfg, workdir, sharded: str = "wq") -> dict:
  """The newest checkpoint restored onto `cfg`'s mesh: its step, a hash per state leaf, the shard shapes of the
  leaves whose path holds `sharded`."""
  tok = tokenizer_lib.load_tokenizer(workdir)
  setup = state_lib.build(cfg, tok.vocab_size, partitioning.make_mesh(cfg))
  with setup.context():
    restored = checkpoint_lib.restore_latest(str(workdir), setup.abstract_state)
  leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(restored.state)]
  hashes = {name: hashlib.sha256(np.asarray(jax.device_get(x)).tobytes()).hexdigest() for name, x in leaves}
  shards = {name: list(x.sharding.shard_shape(x.shape)) for name, x in leaves if sharded in name}
  return {"step": restored.step, "hashes": hashes, "shards": shards}


def train_on_mesh(config: dict, workdir: str, copy_from: str = "", sharded: str = "wq") -> dict:
  """Trains `tiny_config(**config)` in `workdir`, first copied from `copy_from` and its checkpoint digested."""
  cfg = tiny_config(**config)
  result = {}
  if copy_from:
    shutil.copytree(copy_from, workdir)
    result["restored"] = digest(cfg, workdir, sharded)
  train.train(cfg, workdir, progress=False)
  result["final"] = digest(cfg, workdir, sharded)
  result["losses"] = {str(r["step"]): r["train/loss"] for r in metrics_lib.read_metrics(workdir)}
  return result


ON_8_DEVICES = """
import json, sys
sys.path.insert(0, "tests")
from resume_test import train_on_mesh
print(json.dumps([train_on_mesh(**run) for run in json.loads({runs!r})]))
"""


def layout_change_config(tmp_path) -> dict:
  """Overrides of the runs that move between meshes: a small corpus in `tmp_path`, a checkpoint every 4 steps."""
  (tmp_path / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i % 13}\n" for i in range(3000)))
  return {
    "data.source": f"text:{tmp_path / 'corpus.txt'}",
    "data.cache_dir": str(tmp_path / "cache"),
    "optim.schedule": "constant",
    "train.checkpoint_every": 4,
    "train.eval_every": 100,
  }


def test_checkpoint_restores_onto_other_meshes_and_training_continues(tmp_path):
  common = layout_change_config(tmp_path)
  data8, grid = str(tmp_path / "data8"), str(tmp_path / "fsdp2_tensor4")
  runs = [
    {"config": {**common, "train.steps": 4, "mesh.data": 8}, "workdir": data8},
    {"config": {**common, "train.steps": 6, "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4}, "workdir": grid},
  ]
  runs[1]["copy_from"] = data8
  data8, grid = run_devices_script(ON_8_DEVICES.format(runs=json.dumps(runs)), devices=8)
  single = train_on_mesh({**common, "train.steps": 6}, str(tmp_path / "single"), copy_from=str(tmp_path / "data8"))

  # Params, optimizer state, counters and RNG come back bit for bit, laid out for the new mesh.
  saved = data8["final"]
  assert saved["step"] == 4
  assert grid["restored"]["hashes"] == saved["hashes"] and single["restored"]["hashes"] == saved["hashes"]
  assert shard_shapes(saved) == shard_shapes(single["restored"]) == {(32, 4, 8)}  # [d_model, heads, head_dim]
  assert shard_shapes(grid["restored"]) == {(16, 1, 8)}  # over fsdp=2 x tensor=4
  # Training continues from step 4 on both meshes, to the same losses up to summation order.
  for run in (grid, single):
    assert run["final"]["step"] == 6 and sorted(map(int, run["losses"])) == list(range(1, 7))
    assert all(run["losses"][str(s)] == data8["losses"][str(s)] for s in range(1, 5))
  for s in ("5", "6"):
    assert grid["losses"][s] == pytest.approx(single["losses"][s], rel=1e-4)
