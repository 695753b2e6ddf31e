import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

EXPERIMENT = """
from lm.config import default_config

def get_config():
  c = default_config()
  c.data.source = "text:{corpus}"
  c.data.seq_len = 32
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.vocab_size = 300
  c.model.d_model = 32
  c.model.n_heads = 2
  c.model.n_kv_heads = 1
  c.model.d_ff = 64
  c.train.batch_size = 4
  c.train.steps = 6
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.log_every = 2
  c.train.checkpoint_every = 3
  return c
"""


def lm(*args, cwd=None, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  return subprocess.run(
    [sys.executable, "-m", "lm.cli", *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=300
  )


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  corpus = root / "corpus"
  corpus.mkdir()
  for i in range(20):
    (corpus / f"doc{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {i * j}\n" for j in range(60)))
  path = root / "exp.py"
  path.write_text(EXPERIMENT.format(corpus=corpus / "*.py"))
  return root, str(path)


@pytest.fixture(scope="module")
def trained(experiment):
  root, path = experiment
  workdir = root / "run"
  out = lm(
    "train",
    "--config",
    path,
    "--workdir",
    str(workdir),
    "--config.train.steps=6",
    "--no-progress",
    env_extra={"LM_DATA_DIR": str(root / "cache")},
  )
  return out, workdir


def test_train_end_to_end(trained):
  out, workdir = trained
  assert out.returncode == 0, out.stderr[-2000:]
  assert "done at step 6" in out.stdout
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 6 and "eval/loss" in rows[-1]
  assert (workdir / "tokenizer.model").exists()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_plot_overlays_runs(trained, tmp_path):
  _, workdir = trained
  out = lm("plot", str(workdir), str(workdir), "--out", str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "loss_vs_tokens.png").stat().st_size > 1000
  assert (tmp_path / "loss_vs_flops.png").stat().st_size > 1000


def assert_user_error(out, message):
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
  assert message in lines[0], lines[0]


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--config.model.nope=1"], "unknown config key: model.nope"),
    (["--config.model.d_model=abc"], "model.d_model must be int"),
    (["--config.model.d_model=33"], "must be divisible by model.n_heads"),
    (["--config.optim.lr=-1"], "optim.lr must be positive"),
    (["--config.data.source=nosuchkind:x"], "unknown"),
    (["--config.data.source=text:/nonexistent/*.txt"], "matches no files"),
    (["--config.train.batch_size"], "needs a value"),
  ],
)
def test_bad_input_is_one_line_and_exit_2(experiment, tmp_path, extra, message):
  _, path = experiment
  workdir = tmp_path / "w"
  out = lm("train", "--config", path, "--workdir", str(workdir), *extra)
  assert_user_error(out, message)
  assert not workdir.exists()  # nothing written before validation


def test_missing_config_file_and_missing_arguments(tmp_path):
  assert_user_error(lm("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)), "not found")
  assert_user_error(lm("train", "--workdir", str(tmp_path)), "--config")
  assert_user_error(lm("frobnicate"), "invalid choice")


def test_workdir_that_is_a_file(experiment, tmp_path):
  _, path = experiment
  (tmp_path / "file").write_text("x")
  out = lm("train", "--config", path, "--workdir", str(tmp_path / "file"), env_extra={"LM_DATA_DIR": str(tmp_path)})
  assert_user_error(out, "is not a directory")


def test_debug_shows_the_traceback(tmp_path):
  out = lm("--debug", "train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path))
  assert out.returncode != 0 and "Traceback" in out.stderr
