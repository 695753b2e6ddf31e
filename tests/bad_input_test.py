"""Bad input of every kind: exit status 2, one line naming the problem, and no file of a workdir changed.

Each case runs `lm.cli.main` in this process (as `python -m lm.cli` would, minus interpreter start-up) and
captures file descriptors 1 and 2, so output from C++ libraries counts too. Non-UTF-8 bytes in a text
source are not bad input: they decode as U+FFFD (see lm/data/sources.py and data_test.py).
"""

import hashlib
import json
import pathlib
import shutil

import pytest

from lm import cli

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
  c.train.steps = 2
  c.train.eval_every = 2
  c.train.eval_batches = 1
  c.train.checkpoint_every = 2
  c.mesh.data = 1
{extra}
  return c
"""


class Files:
  """A trained workdir `run` and the files the cases need, all under `root`."""

  def __init__(self, root):
    self.root = root
    self.exp = self.experiment("exp")
    self.run = root / "run"

  def experiment(self, name: str, extra: str = "", text: str | None = None) -> str:
    path = self.root / f"{name}.py"
    path.write_text(text if text is not None else EXPERIMENT.format(root=self.root, extra=extra))
    return str(path)

  def copy_run(self, tmp_path, drop: tuple = ()):
    """A copy of the trained workdir without the `drop` paths."""
    copy = tmp_path / "run"
    shutil.copytree(self.run, copy)
    for name in drop:
      shutil.rmtree(copy / name) if (copy / name).is_dir() else (copy / name).unlink()
    return copy


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input")
  (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i % 13}\n" for i in range(3000)))
  (root / "empty.txt").write_text("")
  (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
  (root / "other_field.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(5)))
  for i in range(2):
    (root / f"two_{i}.txt").write_text(f"document {i}\n")
  (root / "file").write_text("a file, not a directory")
  chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  pair = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
  lines = {
    "pairs": [pair] * 4,
    "bad_chats": [{"messages": chat}, {"messages": [{"role": "robot", "content": "beep"}]}],
    "bad_pairs": [pair, pair, {"prompt": "hi", "chosen": "hello"}],
    "long_chat": [{"messages": chat}, {"messages": [{"role": "user", "content": "x" * 40}, *chat[1:]]}],
  }
  for name, records in lines.items():
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  f = Files(root)
  wrong_type = "def get_config():\n  return ConfigDict({'train': {'steps': 'ten'}})\n"
  f.experiment("wrong_type", text="from ml_collections import ConfigDict\n\n" + wrong_type)
  f.experiment("raises", text="def get_config():\n  raise ValueError('no such preset')\n")
  f.experiment("syntax_error", text="def get_config(:\n")
  f.experiment("no_get_config", text="config = {}\n")
  f.experiment("returns_dict", text="def get_config():\n  return {'model': {}}\n")
  assert cli.main(["train", "--config", f.exp, "--workdir", str(f.run), "--no-progress"]) == 0
  (root / "unstarted").mkdir()  # a run's config and tokenizer, but no checkpoint
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(f.run / name, root / "unstarted" / name)
  return f


def snapshot(root) -> dict | None:
  """Every path under `root` with its mtime and, for files, a hash of its bytes; None if it does not exist."""
  if not root.exists():
    return None
  if root.is_file():
    return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
  return {
    str(p.relative_to(root)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest())
    for p in sorted(root.rglob("*"))
  }


def edited_config_json(f, tmp_path):
  """A copy of the run whose config.json claims the 64-wide model its checkpoint is not."""
  copy = f.copy_run(tmp_path)
  saved = json.loads((copy / "config.json").read_text())
  saved["model"]["d_model"] = 64
  (copy / "config.json").write_text(json.dumps(saved))
  return copy


def checkpoints_only(f, tmp_path):
  """A new workdir holding checkpoints (and the tokenizer) copied from another model's run."""
  return f.copy_run(tmp_path, drop=("config.json", "metrics.jsonl", "plots", "tb"))


def all_checkpoints_damaged(f, tmp_path):
  """A copy of the run whose only checkpoint has its largest array file truncated."""
  copy = f.copy_run(tmp_path)
  largest = max((copy / "checkpoints" / "2" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as file:
    file.truncate(100)
  return copy


def garbage(name):
  def make(f, tmp_path):
    copy = f.copy_run(tmp_path)
    (copy / name).write_text("{not json\n")
    return copy

  return make


# name: (extra arguments, the message's key words, the workdir: a kind or a function making one[, experiment])
CASES = {
  # config values
  "unknown key": (["--config.model.nope=1"], "unknown config key: model.nope", "run"),
  "unknown section": (["--config.model=3"], "unknown config key: model", "run"),
  "wrong type": (["--config.model.d_model=abc"], "model.d_model must be int, got 'abc'", "run"),
  "zero size": (["--config.model.d_model=0"], "model.d_model must be positive, got 0", "run"),
  "negative size": (["--config.train.batch_size=-8"], "train.batch_size must be positive", "run"),
  "zero steps": (["--config.train.steps=0"], "train.steps must be positive", "run"),
  "heads do not divide width": (["--config.model.n_heads=3"], "must be divisible by model.n_heads (3)", "run"),
  "heads not a multiple of kv heads": (["--config.model.n_kv_heads=3"], "multiple of model.n_kv_heads (3)", "run"),
  "seq_len below 2": (["--config.data.seq_len=1"], "data.seq_len must be at least 2, got 1", "run"),
  "unknown schedule": (["--config.optim.schedule=linear"], "optim.schedule must be one of", "run"),
  "mesh larger than the devices": (["--config.mesh.data=2"], "needs 2 devices, but 1 are present", "run"),
  "unknown objective": (
    ["--config.train.objective=nope"],
    "train.objective must be one of ('lm', 'reward', 'dpo', 'ppo', 'grpo'), got 'nope'",
    "run",
  ),
  "bad fault-injection steps": (["--config.train.debug_nan_steps=3,x"], "train.debug_nan_steps must be", "run"),
  "zero max_bad_steps": (["--config.train.max_bad_steps=0"], "train.max_bad_steps must be positive", "run"),
  # command line and experiment file
  "override without a value": (["--config.train.steps"], "--config.train.steps needs a value", "run"),
  "unknown option": (["--frobnicate"], "unrecognized arguments: --frobnicate", "run"),
  "config file missing": ([], "config file not found: {root}/nonexistent.py", "run", "nonexistent"),
  "config of the wrong type": ([], "train.steps must be int, got str 'ten'", "run", "wrong_type"),
  "config raising": ([], "get_config() raised ValueError: no such preset", "run", "raises"),
  "config with a syntax error": ([], "importing it raised SyntaxError", "run", "syntax_error"),
  "config without get_config": ([], "defines no get_config()", "run", "no_get_config"),
  "config returning a dict": ([], "get_config() must return an ml_collections.ConfigDict", "run", "returns_dict"),
  # data
  "unknown data source": (["--config.data.source=nosuch:x"], "unknown data.source 'nosuch:x'", "run"),
  "glob matching nothing": (["--config.data.source=text:/nonexistent/*.txt"], "matches no files", "run"),
  "empty file": (["--config.data.source=text:{root}/empty.txt"], "is empty: 1 files, no text", "run"),
  "invalid JSON line": (["--config.data.source=jsonl:{root}/bad.jsonl"], "bad.jsonl:2: invalid JSON", "run"),
  "missing text field": (["--config.data.source=jsonl:{root}/other_field.jsonl"], "no string field 'text'", "run"),
  "too few documents to hold out": (
    ["--config.data.source=text:{root}/two_*.txt", "--config.data.eval_fraction=0.6", "--config.data.eval_split=tail"],
    "has 2 documents: too few to hold out",
    "fresh",
  ),
  "train split smaller than a batch": (
    ["--config.data.source=text:{root}/two_*.txt", "--config.data.eval_fraction=0.4"],
    "fewer than one batch of train.batch_size=8",
    "fresh",
  ),
  # post-training data and objectives
  "conversation with an unknown role": (
    ["--config.data.post_source=jsonl:{root}/bad_chats.jsonl"],
    "{root}/bad_chats.jsonl:2: message 0 has unknown role 'robot'",
    "fresh",
  ),
  "pair without a rejected reply": (
    ["--config.train.objective=reward", "--config.data.post_source=jsonl:{root}/bad_pairs.jsonl"],
    "{root}/bad_pairs.jsonl:3: missing key 'rejected'",
    "fresh",
  ),
  "conversation too long for overlong=error": (
    ["--config.data.post_source=jsonl:{root}/long_chat.jsonl", "--config.data.overlong=error"],
    "long_chat.jsonl:2: the conversation is 50 tokens, more than seq_len + 1 = 33 (overlong=error)",
    "fresh",
  ),
  "reward model without pairs": (
    ["--config.train.objective=reward"],
    "train.objective=reward needs data.post_source: preference pairs",
    "fresh",
  ),
  "dpo without init_from": (
    ["--config.train.objective=dpo", "--config.data.post_source=jsonl:{root}/pairs.jsonl"],
    "train.objective=dpo needs train.init_from: the run (an SFT model, say) whose params start the policy",
    "fresh",
  ),
  "pairs split across microbatches": (
    ["--config.train.objective=reward", "--config.data.post_source=jsonl:{root}/pairs.jsonl"]
    + ["--config.train.batch_size=6", "--config.optim.grad_accum_steps=2"],
    "train.batch_size / optim.grad_accum_steps (3) must be even",
    "fresh",
  ),
  # tokenizer
  "vocab larger than the corpus supports": (
    ["--config.tokenizer.kind=sentencepiece", "--config.tokenizer.vocab_size=100000"],
    "tokenizer.vocab_size=100000 is too large for this training text",
    "fresh",
  ),
  "tokenizer missing from a workdir": ([], "has checkpoints but its tokenizer is missing", "no tokenizer"),
  "tokenizer unreadable": ([], "cannot read the tokenizer in", garbage("tokenizer.json")),
  "tokenizer of another kind": (
    ["--config.tokenizer.kind=sentencepiece", "--config.tokenizer.vocab_size=300"],
    "holds a byte tokenizer of 264 tokens, not the configured sentencepiece tokenizer of 300 tokens",
    checkpoints_only,
  ),
  # workdir
  "workdir is a file": ([], "exists and is not a directory", "file"),
  "workdir under a file": ([], "cannot be created: {root}/file is not a directory", "under file"),
  "workdir unwritable": (["--config.train.min_free_bytes=0"], "cannot write to workdir", "unwritable"),
  "disk too full": (["--config.train.min_free_bytes=1e18"], "MiB are needed (room for two checkpoints", "run"),
  "resume with another model shape": (
    ["--config.model.d_model=64"],
    "holds a run with a different config: model.d_model: 32 -> 64",
    "run",
  ),
  "resume with other data and optimizer": (
    ["--config.data.seq_len=64", "--config.optim.lr=0.1"],
    "different config: data.seq_len: 32 -> 64, optim.lr: 0.003 -> 0.1",
    "run",
  ),
  "init_from a missing directory": (
    ["--config.train.init_from={root}/nowhere"],
    "train.init_from: {root}/nowhere is not a run directory (no config.json)",
    "fresh",
  ),
  "init_from a run without a checkpoint": (
    ["--config.train.init_from={root}/unstarted"],
    "train.init_from: {root}/unstarted has no checkpoint to load",
    "fresh",
  ),
  "init_from a run of another shape": (
    ["--config.train.init_from={root}/run", "--config.model.d_model=64"],
    "train.init_from: the params of {root}/run do not fit this run's model: the source parameters' shapes differ: "
    "embed (264, 32) (want (264, 64))",
    "fresh",
  ),
  "init_from the run itself": (["--config.train.init_from={root}/run"], "names the run's own workdir", "run"),
  "config.json unreadable": ([], "cannot read", garbage("config.json")),
  "metrics.jsonl unreadable": ([], "metrics.jsonl:1: not a JSON row", garbage("metrics.jsonl")),
  # checkpoints
  "checkpoint of another model, config.json edited": (
    ["--config.model.d_model=64"],
    "checkpoint 2 in {workdir} is from a run with a different config: model.d_model: 32 -> 64",
    edited_config_json,
  ),
  "checkpoint copied from another model's run": (
    ["--config.model.d_model=64"],
    "checkpoint 2 in {workdir} is from a run with a different config: model.d_model: 32 -> 64",
    checkpoints_only,
  ),
  "no checkpoint restores": (
    [],
    "no checkpoint in {workdir}/checkpoints can be restored (step 2:",
    all_checkpoints_damaged,
  ),
}


def workdir_for(kind, f, tmp_path) -> pathlib.Path:
  if callable(kind):
    return kind(f, tmp_path)
  if kind == "no tokenizer":
    return f.copy_run(tmp_path, drop=("tokenizer.json",))
  places = {
    "run": f.run,
    "fresh": tmp_path / "new_run",
    "file": f.root / "file",
    "under file": f.root / "file" / "run",
    "unwritable": pathlib.Path("/sys/lm-test-run"),  # not creatable, even by root
  }
  return places[kind]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_changes_nothing(files, tmp_path, capfd, case):
  extra, message, kind, *experiment = CASES[case]
  workdir = workdir_for(kind, files, tmp_path)
  config = str(files.root / f"{experiment[0]}.py") if experiment else files.exp
  argv = ["train", "--config", config, "--workdir", str(workdir), "--no-progress"]
  argv += [a.format(root=files.root) for a in extra]
  before = snapshot(workdir)
  capfd.readouterr()
  assert cli.main(argv) == 2
  err = capfd.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("lm: error: ") and message.format(root=files.root, workdir=workdir) in err, err
  assert snapshot(workdir) == before
