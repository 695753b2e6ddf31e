import argparse
import csv
import os

import pytest

from lm import config as config_lib
from lm import train
from lm.errors import UserError
from lm.scaling import accounting, cli, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = """
from lm.config import default_config
from lm.scaling import sweep


def get_config():
  c = default_config()
  c.data.source = {source!r}
  c.data.seq_len = 32
  c.tokenizer.kind = "byte"
  c.model.d_model = 32
  c.model.n_layers = 1
  c.model.d_ff = 64
  c.model.n_kv_heads = 1
  c.train.batch_size = 8
  c.train.eval_every = 2
  c.train.eval_batches = 1
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.optim.warmup_steps = 1
  c.mesh.data = 1
  return c


def get_sweep():
  return sweep.grid({{"model.n_heads": [2, 4], "train.steps": [2, 4]}})
"""


def write_experiment(tmp_path, source):
  path = tmp_path / "exp.py"
  path.write_text(EXPERIMENT.format(source=source))
  return str(path)


def test_tiny_sweep_runs_skips_finished_points_and_aggregates(tmp_path, text_corpus, monkeypatch):
  exp, workdir = write_experiment(tmp_path, text_corpus), str(tmp_path / "sweep")
  results = sweep.run_sweep(exp, workdir, progress=False)
  with open(results) as f:
    rows = list(csv.DictReader(f))
  assert [r["id"] for r in rows] == ["p000", "p001", "p002", "p003"]
  assert set(sweep.RESULT_COLUMNS) <= set(rows[0])
  for row in rows:
    cfg = config_lib.from_json(open(os.path.join(workdir, row["id"], "config.json")).read())
    assert int(row["D"]) == cfg.train.steps * 8 * 32
    assert float(row["C"]) == pytest.approx(accounting.training_flops(cfg, int(row["D"])))
    assert float(row["best_eval_loss"]) <= float(row["loss"]) and int(row["N_total"]) > int(row["N"]) > 0
  assert os.path.exists(os.path.join(workdir, "curves.csv"))

  calls = []
  real_train = train.train
  monkeypatch.setattr(train, "train", lambda cfg, wd, progress=True: calls.append(wd) or real_train(cfg, wd, progress))
  os.remove(os.path.join(workdir, "p003", "result.json"))  # an unfinished point: it resumes, the rest skip
  sweep.run_sweep(exp, workdir, progress=False)
  assert calls == [os.path.join(workdir, "p003")]
  with open(results) as f:
    assert len(list(csv.DictReader(f))) == 4


def test_print_commands_one_per_point(tmp_path, text_corpus, capsys):
  exp = write_experiment(tmp_path, text_corpus)
  p = argparse.ArgumentParser()
  cli.add_parsers(p.add_subparsers(dest="command"))
  args = p.parse_args(["sweep", "--config", exp, "--workdir", "runs/s", "--print-commands"])
  assert cli.run(args, ["train.seed=3"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4
  assert lines[3].startswith(f"lm train --config {exp} --workdir runs/s/p003")
  assert "--config.model.n_heads=4" in lines[3] and lines[3].endswith("--config.train.seed=3")


def test_sweep_without_get_sweep_is_a_user_error(tmp_path):
  path = tmp_path / "plain.py"
  path.write_text("from lm.config import default_config\n\n\ndef get_config():\n  return default_config()\n")
  with pytest.raises(UserError, match="defines no get_sweep"):
    sweep.load_sweep(str(path))


def test_model_shape_follows_ladder_rules():
  for target in (5e7, 1e8, 1e9):
    shape = sweep.model_shape(target, 32000, aspect=64, head_dim=128)
    assert shape["model.d_model"] == shape["model.n_heads"] * 128
    n = sweep._params(shape, 32000)["flop_params"]
    assert 0.5 < n / target < 2.0


def test_isoflop_tpu_plan_is_valid_and_spends_each_budget():
  points = sweep.load_sweep(os.path.join(REPO, "experiments", "isoflop_tpu.py"))
  budgets = {}
  for point_id, cfg, _ in points:
    config_lib.validate(cfg, num_devices=256)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    flops_used = accounting.training_flops(cfg, tokens, 32000)
    budget = float(point_id.split("_")[0][1:])
    assert flops_used == pytest.approx(budget, rel=0.01), point_id
    assert cfg.optim.warmup_steps < cfg.train.steps
    budgets.setdefault(budget, []).append(point_id)
  assert sorted(budgets) == [1e17, 1e18, 1e19, 1e20] and all(len(v) >= 3 for v in budgets.values())
