"""Shared fixtures: tiny configs and a runner for scripts that need several simulated devices."""

import contextlib
import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from lm import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Most tests compile the same tiny programs; a persistent cache shared by every test process (xdist
# workers and the scripts they start) compiles each once. Set before JAX initialises its backends.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny: LLVM's optimisation of their kernels costs more compile time than it
# saves in run time (bench_test and model_test from a cold cache: 120 s, 84 s without it).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


# Modules whose tests share a costly module-scoped fixture (training runs, compiles, a trained tokenizer).
# xdist's default scheduling deals a module's tests out to both workers in chunks, and then both pay for
# the fixture; under `-n`, these modules each run whole on one worker, biggest first, and every other test
# is scheduled on its own.
SHARED_SETUP = set(
  "chat cli dpo evals_instruct evals_tasks fault harness hf hf_tokenizer init_from knowledge lora_train partitioning"
  " plan prepare reward rl_objective sample_cli sampling tokenizer_cli tokenizer train".split()
)  # the modules' names without _test.py


def pytest_xdist_make_scheduler(config, log):
  if config.getoption("dist") != "load":
    return None  # an explicit --dist keeps xdist's own scheduler
  from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415

  class SharedSetupScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::", 1)[0]
      return module if os.path.basename(module).removesuffix("_test.py") in SHARED_SETUP else nodeid

  return SharedSetupScheduling(config, log)


TINY = {
  "model.d_model": 32,
  "model.n_layers": 2,
  "model.n_heads": 4,
  "model.n_kv_heads": 2,
  "model.d_ff": 64,
  "data.seq_len": 32,
  "tokenizer.kind": "byte",
  "train.batch_size": 8,
  "train.steps": 10,
  "train.eval_every": 5,
  "train.eval_batches": 2,
  "train.log_every": 1,
  "train.checkpoint_every": 5,
  "optim.warmup_steps": 2,
  "mesh.data": 1,
}


def tiny_config(**overrides):
  """A config small enough to train in seconds on one CPU core."""
  cfg = config_lib.default_config()
  for key, value in {**TINY, **overrides}.items():
    config_lib.set_key(cfg, key, value)
  return cfg


def write_experiment(path, **values) -> str:
  """Writes an experiment file whose get_config() is the defaults with `values` ({"model.d_model": 32, ...})."""
  lines = ["from lm.config import default_config", "", "", "def get_config():", "  c = default_config()"]
  lines += [f"  c.{key} = {value!r}" for key, value in values.items()]
  path.write_text("\n".join([*lines, "  return c", ""]))
  return str(path)


def random_batch(batch: int, length: int, vocab: int, seed: int = 0, split: int | None = None) -> dict:
  """A batch in the common format; rows hold two documents when `split` is given."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
  segments = np.ones((batch, length), np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
  if split:
    segments[:, split:] = 2
    positions[:, split:] -= split
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": segments,
    "positions": positions,
    "loss_mask": np.ones((batch, length), np.float32),
  }


def run_devices_script(code: str, devices: int = 8, timeout: int = 300):
  """Runs `code` in a fresh Python with `devices` simulated CPU devices; returns its last JSON line."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, check=False
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_lm(*args, check: bool = True) -> types.SimpleNamespace:
  """`lm ARGS` run in this process as the command runs (errors one line on stderr, exit status 2), without a new
  interpreter's imports: (returncode, stdout, stderr)."""
  from lm import cli  # noqa: PLC0415

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = cli.main([str(a) for a in args])
  result = types.SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())
  if check:
    assert status == 0, result.stderr[-3000:]
  return result


@pytest.fixture
def text_corpus(tmp_path):
  """A small text file source of Python-like text."""
  path = tmp_path / "corpus.txt"
  path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)))
  return f"text:{path}"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LM_DATA_DIR", str(tmp_path / "tfds_cache"))


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def length_reward(prompt, response: str, metadata: dict) -> float:
  """A reward function for RL tests (`rl.reward_fn = "conftest:length_reward"`): varied for any model's replies."""
  del prompt, metadata
  return len(response) / 16


def write_conversations(path, n: int, seed: int = 0) -> str:
  """`n` conversations as JSONL: the user says 8 random letters (noise), the assistant always replies "yes".

  Returns the `jsonl:` source.
  """
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    noise = "".join(rng.choice(list(LETTERS), 8))
    messages = [{"role": "user", "content": noise}, {"role": "assistant", "content": "yes"}]
    lines.append(json.dumps({"messages": messages}))
  path.write_text("\n".join(lines) + "\n")
  return f"jsonl:{path}"


def write_pairs(path, n: int, seed: int = 0) -> str:
  """`n` preference pairs as JSONL (TRL's standard form) with a learnable rule: to a prompt of 3-5 random letters,
  the chosen reply is 3-5 random vowels, the rejected one 3-5 random consonants. Returns the `jsonl:` source."""
  rng = np.random.default_rng(seed)
  vowels, consonants = list("aeiou"), [c for c in LETTERS if c not in "aeiou"]

  def word(letters):
    return "".join(rng.choice(list(letters), int(rng.integers(3, 6))))

  lines = [
    json.dumps({"prompt": word(LETTERS), "chosen": word(vowels), "rejected": word(consonants)}) for _ in range(n)
  ]
  path.write_text("\n".join(lines) + "\n")
  return f"jsonl:{path}"
