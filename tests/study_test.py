"""`lm study`: a chain of dependent runs and steps, skipped when finished, resumed when interrupted."""

import json

import pytest

from lm import cli
from lm import metrics as metrics_lib

from conftest import write_experiment

STUDY = """
import json
import os

CALLS = {calls!r}


def write_corpus(stage_dir):
  with open(CALLS, "a") as f:
    f.write("corpus\\n")
  path = os.path.join(stage_dir, "corpus.txt")
  with open(path, "w") as f:
    f.write("".join(f"line {{i}}: a study of {{i % 7}}\\n" for i in range(2000)))
  return {{"path": path}}


def read_loss(run_dir, stage_dir):
  with open(CALLS, "a") as f:
    f.write("read\\n")
  if os.path.exists({fail!r}):
    raise RuntimeError("interrupted")
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  return {{"loss": [r for r in rows if "eval/loss" in r][-1]["eval/loss"]}}


def get_study(workdir):
  source = "text:" + workdir + "/corpus/corpus.txt"
  return [
    {{"id": "corpus", "run": write_corpus}},
    {{"id": "base", "config": "tiny.py", "overrides": {{"data.source": source, "train.steps": 4}}}},
    {{"id": "tuned", "config": "tiny.py", "init_from": "base", "overrides": {{"data.source": source}}}},
    {{"id": "score", "run": lambda d: read_loss(workdir + "/tuned", d)}},
  ]


def get_report(results):
  return {{"tuned_loss": results["score"]["loss"], "base_loss": results["base"]["eval/loss"]}}
"""


def tiny(path):
  write_experiment(
    path,
    **{
      "data.seq_len": 32,
      "tokenizer.kind": "byte",
      "model.d_model": 32,
      "model.n_layers": 1,
      "model.n_heads": 2,
      "model.n_kv_heads": 1,
      "model.d_ff": 64,
      "train.batch_size": 8,
      "train.steps": 2,
      "train.eval_every": 2,
      "train.eval_batches": 1,
      "train.checkpoint_every": 2,
      "data.eval_min_tokens": 0,
      "optim.warmup_steps": 1,
      "mesh.data": 1,
    },
  )


def test_a_study_runs_its_stages_in_order_then_skips_them(tmp_path, capfd):
  calls, fail = tmp_path / "calls.txt", tmp_path / "fail"
  tiny(tmp_path / "tiny.py")
  (tmp_path / "study.py").write_text(STUDY.format(calls=str(calls), fail=str(fail)))
  workdir = tmp_path / "out"
  args = ["study", "--config", str(tmp_path / "study.py"), "--workdir", str(workdir), "--no-progress"]
  fail.touch()
  with pytest.raises(RuntimeError, match="interrupted"):  # the last step fails once: the runs are kept
    cli.main(args)
  fail.unlink()
  capfd.readouterr()
  assert cli.main(args) == 0
  out = capfd.readouterr().out
  assert "study: corpus finished, skipped" in out and "study: base finished, skipped" in out
  assert "study: tuned finished, skipped" in out and "study: running score" in out
  assert calls.read_text().split() == ["corpus", "read", "read"]  # steps run again only when unfinished
  report = json.loads((workdir / "report" / "report.json").read_text())
  tuned_rows = [r for r in metrics_lib.read_metrics(str(workdir / "tuned")) if "eval/loss" in r]
  assert report["tuned_loss"] == tuned_rows[-1]["eval/loss"]
  assert report["stages"]["tuned"]["init_from"] == "base" and report["stages"]["score"]["kind"] == "step"
  # The tuned run started from the base run's parameters: its first eval is near the base's last.
  base_loss = report["base_loss"]
  assert abs(tuned_rows[0]["eval/loss"] - base_loss) < abs(tuned_rows[0]["eval/loss"] - 5.6)
  assert "| tuned_loss |" in (workdir / "report" / "report.md").read_text()
  capfd.readouterr()
  assert cli.main(args) == 0
  assert calls.read_text().split() == ["corpus", "read", "read"]


@pytest.mark.parametrize(
  "stages, message",
  [
    ("[]", "returned no stages"),
    ('[{"id": "a", "run": print}, {"id": "a", "run": print}]', "unique"),
    ('[{"id": "a", "config": "tiny.py", "run": print}]', "exactly one of"),
    ('[{"id": "a", "config": "tiny.py", "init_from": "b"}, {"id": "b", "config": "tiny.py"}]', "earlier run stage"),
    ('[{"id": "a", "run": 3}]', "must be a callable"),
  ],
)
def test_a_bad_study_is_one_line_before_anything_runs(tmp_path, capfd, stages, message):
  tiny(tmp_path / "tiny.py")
  (tmp_path / "study.py").write_text(f"def get_study(workdir):\n  return {stages}\n")
  workdir = tmp_path / "out"
  assert cli.main(["study", "--config", str(tmp_path / "study.py"), "--workdir", str(workdir)]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("lm: error: ") and message in err[0], err
  assert not workdir.exists()
