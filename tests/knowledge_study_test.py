"""experiments/knowledge.py end to end on a tiny world and tiny models: every stage runs, the report holds every
headline number as a rate, and the figure is drawn. (The measured numbers come from the full study; README.)"""

import json
import os

from lm import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRAPPER = """
from lm.config import load_module

STUDY = load_module({path!r})
SIZES = {{"sft": 3, "probe_known": 2, "test_known": 2, "probe_unknown": 2, "test_unknown": 2, "tool": {tool}}}


def get_study(workdir):
  return STUDY.get_study(workdir, {args}sizes=SIZES)


get_report = STUDY.get_report
"""
TINY = {
  "model.d_model": 32,
  "model.n_layers": 1,
  "model.n_heads": 2,
  "model.n_kv_heads": 1,
  "model.d_ff": 64,
  "train.batch_size": 2,
  "train.steps": 2,
  "train.eval_every": 2,
  "train.eval_batches": 1,
  "train.checkpoint_every": 2,
  "train.log_every": 1,
  "data.eval_min_tokens": 0,
  "optim.warmup_steps": 1,
  "mesh.data": 1,
  "data.seq_len": 160,
}
KEYS = (
  "known_accuracy_single", "known_accuracy_augmented", "hallucination_rate_unknown", "refusal_rate_unknown",
  "false_refusal_rate_known", "known_accuracy_before", "known_accuracy_after", "confidence_ap",
  "unknown_accuracy_with_tool", "unknown_accuracy_without_tool", "in_context_accuracy",
  "identity_rate_with_system", "identity_rate_without_system", "name_familiarity_ap", "refusal_rate_unknown_probes",
  "false_refusal_rate_known_probes", "gate_refusal_rate_unknown", "gate_false_refusal_rate_known",
  "gate_known_accuracy_after", "name_probe_ap", "answer_probe_ap", "value_share_ap_base", "value_share_ap_sft",
)  # fmt: skip


def run_study(tmp_path, experiment, tool, args):
  """`lm study` on a wrapper of experiments/EXPERIMENT with tiny groups and TINY models: its workdir and report."""
  study = tmp_path / "study.py"
  path = os.path.join(REPO, "experiments", experiment)
  study.write_text(WRAPPER.format(path=path, tool=tool, args=args))
  workdir = tmp_path / "study"
  overrides = [f"--config.{k}={v}" for k, v in TINY.items()] + [f"--config.data.cache_dir={tmp_path / 'cache'}"]
  cli.main(["study", "--config", str(study), "--workdir", str(workdir), "--no-progress", *overrides])
  return workdir, json.loads((workdir / "report" / "report.json").read_text())


def test_the_study_runs_every_stage_and_reports_every_rate(tmp_path):
  workdir, report = run_study(tmp_path, "knowledge.py", tool=5, args="paraphrases=(1, 2), ")
  for key in KEYS:
    assert 0.0 <= report[key] <= 1.0, key
  assert (workdir / "report" / "knowledge.png").stat().st_size > 10_000
  assert (workdir / "interrogate" / "refusal_train.jsonl").exists()
  refuse = json.loads((workdir / "refuse" / "config.json").read_text())
  assert refuse["data"]["post_source"].endswith("interrogate/refusal_train.jsonl")
  assert json.loads((workdir / "refuse" / "init_from.json").read_text())["run"].endswith("sft_p2")


def test_the_tail_study_reads_passing_people_once_and_reports_its_rates(tmp_path):
  workdir, report = run_study(tmp_path, "knowledge_tail.py", tool=0, args="passing=6, repeats=2, ")
  assert set(report["stages"]) == {
    "world", "base_p64", "recall_p64", "sft_p64", "qa_p64", "calibration", "interrogate", "probe", "refuse",
    "refuse_eval", "gate_eval",
  }  # fmt: skip
  for key, value in report.items():
    if key != "stages":
      assert 0.0 <= value <= 1.0, key
  docs = [json.loads(line)["text"] for line in (workdir / "world" / "pretrain_p64.jsonl").read_text().splitlines()]
  assert len(docs) == 2 * 64 * (3 + 2 + 2) + 6
