"""`lm sample` end to end on a tiny trained run (in this process, through `lm.cli.main`), its bad
input, and the samples that training logs at eval time.

The run is the model of bad_input_test.py, so the two share compiled programs through the persistent
compilation cache, and every sampling call has the shapes of the eval-time one (a batch of 2, prompts
and outputs of at most 16 tokens), so it compiles once.
"""

import io
import json
import shutil

import pytest

from lm import cli, sample_cli, sampling

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
  c.train.sample_prompts = ["line 1", "the quick"]
  c.train.sample_tokens = 8
  c.mesh.data = 1
  return c
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample_cli")
  (root / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox {i % 13}\n" for i in range(3000)))
  (root / "exp.py").write_text(EXPERIMENT.format(root=root))
  assert cli.main(["train", "--config", str(root / "exp.py"), "--workdir", str(root / "run"), "--no-progress"]) == 0
  return root / "run"


def sample(capfd, *args) -> tuple[int, str, str]:
  capfd.readouterr()
  status = cli.main(["sample", *args])
  out, err = capfd.readouterr()
  return status, out, err


def test_training_logs_samples_that_lm_sample_reproduces(run, capfd):
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [2]
  logged = evals[0]
  assert logged["samples/0"].startswith("line 1") and logged["samples/1"].startswith("the quick")
  events = b"".join(p.read_bytes() for p in (run / "tb").rglob("events*"))
  assert b"samples/0" in events and b"samples/1" in events
  # Greedy from the checkpoint of the same step, as at eval: the same text, prompt included.
  args = ["--workdir", str(run), "--prompt", "line 1", "--max-new-tokens", "8", "--temperature", "0"]
  status, out, err = sample(capfd, *args, "--num-samples", "2", "--seed", "3")
  assert status == 0, err
  text = logged["samples/0"]
  assert out == f"=== sample 1 of 2 (seed 3) ===\n{text}\n=== sample 2 of 2 (seed 4) ===\n{text}\n"


def test_json_has_per_token_logprobs_and_a_seed_per_sample(run, capfd):
  before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
  args = ["--workdir", str(run), "--prompt", "the", "--max-new-tokens", "6", "--top-k", "20", "--seed", "5"]
  status, out, err = sample(capfd, *args, "--num-samples", "2", "--json", "--stop", "zzz")
  assert status == 0, err
  lines = out.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  assert record["prompt"] == "the" and record["prompt_tokens"] == 4 and not record["truncated"]
  assert [s["seed"] for s in record["samples"]] == [5, 6]
  for s in record["samples"]:
    assert s["finish_reason"] in ("stop", "length")
    assert 1 <= len(s["tokens"]) <= 6 and (len(s["tokens"]) == 6) == (s["finish_reason"] == "length")
    assert all(t["logprob"] <= 0 and isinstance(t["id"], int) for t in s["tokens"])
    assert "".join(t["text"] for t in s["tokens"]) == s["text"]
  assert record["samples"][0]["tokens"] != record["samples"][1]["tokens"]
  assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # sampling writes nothing


def test_json_tokens_end_where_the_text_ends_at_a_stop_string(run, capfd):
  from lm.tokenizer import load_tokenizer  # noqa: PLC0415

  args = ["--workdir", str(run), "--prompt", "the", "--max-new-tokens", "12", "--top-k", "20", "--seed", "5"]
  status, out, err = sample(capfd, *args, "--num-samples", "2", "--json")
  assert status == 0, err
  full = json.loads(out)["samples"][0]
  text = full["text"]
  assert len(full["tokens"]) == 12 and len(text) >= 6
  stop = text[len(text) // 2 : len(text) // 2 + 2]
  status, out, err = sample(capfd, *args, "--num-samples", "2", "--json", "--stop", stop)
  assert status == 0, err
  cut = json.loads(out)["samples"][0]
  assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
  assert "".join(t["text"] for t in cut["tokens"]) == cut["text"]
  ids = [t["id"] for t in cut["tokens"]]
  assert ids == [t["id"] for t in full["tokens"]][: len(ids)] and len(ids) < 12
  assert [t["logprob"] for t in cut["tokens"]] == [t["logprob"] for t in full["tokens"]][: len(ids)]
  assert load_tokenizer(run).decode(ids) == cut["text"]  # byte tokens: no token straddles the stop string


def test_truncate_left_keeps_the_end_of_a_long_prompt(run, capfd):
  long = "line 9: the quick brown fox 9\nline 10: the"
  args = ["--workdir", str(run), "--prompt", long, "--max-new-tokens", "16", "--temperature", "0"]
  status, _, err = sample(capfd, *args)
  assert status == 2 and "exceeds the context of 32 tokens" in err
  status, out, err = sample(capfd, *args, "--truncate", "left", "--json", "--num-samples", "2")
  assert status == 0, err
  record = json.loads(out)
  assert record["truncated"] and record["prompt_tokens"] == 16 and record["prompt"] == long[-16:]


def test_streamed_text_arrives_in_pieces_one_sample_after_another(monkeypatch):
  from lm.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  ids = tok.encode(["ab\n\ncd", "xyz\u00e9"])
  requests = [sampling.SamplingParams(stop_strings=("\n\n",), seed=s) for s in (3, 4)]
  steps = [
    sampling.Progress([ids[0][:3], ids[1][:2]], [[0.0] * 3, [0.0] * 2], [False, False]),  # "ab\n" holds back "\n"
    sampling.Progress([ids[0][:6], ids[1][:4]], [[0.0] * 6, [0.0] * 4], [True, False]),  # stop string; half an é
    sampling.Progress([ids[0][:6], ids[1]], [[0.0] * 6, [0.0] * 5], [True, True]),
  ]
  writes = []

  class Recorder(io.StringIO):
    def flush(self):
      writes.append(self.getvalue())

  monkeypatch.setattr("sys.stdout", Recorder())
  sample_cli.print_stream(iter(steps), tok, "P:", requests)
  assert writes == [
    "=== sample 1 of 2 (seed 3) ===\nP:ab",
    "=== sample 1 of 2 (seed 3) ===\nP:ab\n=== sample 2 of 2 (seed 4) ===\nP:xyz",
    "=== sample 1 of 2 (seed 3) ===\nP:ab\n=== sample 2 of 2 (seed 4) ===\nP:xyz\u00e9\n",
  ]


def no_checkpoint(run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
  return copy


CASES = {
  "negative temperature": (["--temperature", "-0.5"], "temperature must be >= 0, got -0.5"),
  "top_p zero": (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
  "top_p above one": (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
  "negative top_k": (["--top-k", "-1"], "top_k must be >= 0, got -1"),
  "max_new_tokens of the whole context": (["--max-new-tokens", "32"], "must be less than the context (32 tokens)"),
  "zero max_new_tokens": (["--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
  "no samples": (["--num-samples", "0"], "num_samples must be at least 1"),
  "empty prompt": (["--prompt", ""], "empty prompt"),
  "empty prompt file": (["--prompt-file", "{tmp}/empty.txt"], "empty prompt"),
  "missing prompt file": (["--prompt-file", "{tmp}/nope.txt"], "cannot read prompt file {tmp}/nope.txt"),
  "prompt longer than the context": (["--prompt", "x" * 40], "prompt (41 tokens) + max_new_tokens (16) exceeds"),
  "prompt and prompt file": (["--prompt-file", "{tmp}/empty.txt", "--prompt", "a"], "not allowed with argument"),
  "not a run directory": (["--workdir", "{tmp}"], "is not a run directory (no config.json)"),
  "workdir without a checkpoint": (["--workdir", no_checkpoint], "has no checkpoint to load"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(run, tmp_path, capfd, case):
  extra, message = CASES[case]
  (tmp_path / "empty.txt").write_text("")
  extra = [str(a(run, tmp_path)) if callable(a) else a.format(tmp=tmp_path) for a in extra]
  args = ["--workdir", str(run), *([] if "--prompt" in extra or "--prompt-file" in extra else ["--prompt", "a"])]
  status, out, err = sample(capfd, *args, *extra)
  assert status == 2 and not out
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("lm: error: ") and message.format(tmp=tmp_path) in err, err
