import csv
import json
import os

import pytest
from etils import epath

from lm import cli, optim, train
from lm import config as config_lib
from lm import metrics as metrics_lib
from lm.errors import UserError
from lm.scaling import accounting, report, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = """
from lm.config import default_config


def get_config():
  c = default_config()
  c.data.source = {source!r}
  c.data.eval_sources = ("again=all:" + {source!r},)
  c.data.seq_len = 32
  c.tokenizer.kind = "byte"
  c.model.d_model = 32
  c.model.n_layers = 1
  c.model.n_heads = 2
  c.model.d_ff = 64
  c.model.n_kv_heads = 1
  c.train.batch_size = 8
  c.train.eval_every = 4
  c.train.eval_batches = 1
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  c.train.evals = ("counting",)
  c.train.evals_limit = 4
  c.optim.warmup_steps = 1
  c.optim.schedule = "wsd"
  c.optim.cooldown_fraction = 0.25
  c.mesh.data = 1
  return c


def get_sweep():
  # `short` cools down from `long`'s checkpoint at step 3; `alone` is the same 4-step WSD run from scratch.
  return [
    {{"id": "long", "train.steps": 8}},
    {{"id": "short", "train.steps": 4, "branch_of": "long"}},
    {{"id": "alone", "train.steps": 4}},
    {{"id": "moe", "train.steps": 2, "model.moe.experts": 4, "model.moe.d_ff": 32}},
  ]
"""


def write_experiment(tmp_path, source):
  path = tmp_path / "exp.py"
  path.write_text(EXPERIMENT.format(source=source))
  return str(path)


def read_rows(path):
  with open(path) as f:
    return {row["id"]: row for row in csv.DictReader(f)}


def test_sweep_branches_cooldowns_skips_finished_points_and_resumes(tmp_path, text_corpus, monkeypatch):
  exp, workdir = write_experiment(tmp_path, text_corpus), str(tmp_path / "sweep")
  calls = []
  real_train = train.train
  monkeypatch.setattr(train, "train", lambda cfg, wd, progress: calls.append(wd) or real_train(cfg, wd, progress))
  rows = read_rows(sweep.run_sweep(exp, workdir, progress=False))
  sub = {name: os.path.join(workdir, name) for name in ("long", "short", "alone", "moe")}
  assert calls == [sub["long"], sub["short"], sub["long"], sub["alone"], sub["moe"]]
  assert set(rows) == {"long", "short", "alone", "moe"} and set(sweep.RESULT_COLUMNS) <= set(rows["long"])
  for name, row in rows.items():
    cfg = config_lib.from_json(open(os.path.join(sub[name], "config.json")).read())
    assert int(row["D"]) == cfg.train.steps * 8 * 32 and row["flops_convention"] == "6N+attn"
    assert float(row["C"]) == pytest.approx(accounting.training_flops(cfg, int(row["D"])))  # the loop's FLOPs
    assert float(row["best_eval_loss"]) <= float(row["loss"]) and int(row["N_total"]) > int(row["N"]) > 0
    # N is what a token uses: a mixture of experts' active parameters, below N_all_experts (every expert).
    dense = name != "moe"
    assert (int(row["N_all_experts"]) == int(row["N"])) == dense and (row["N_active"] == row["N_total"]) == dense
    last = [r for r in metrics_lib.read_metrics(sub[name]) if "eval/loss" in r][-1]
    assert float(row["loss_again"]) == pytest.approx(last["eval/again/loss"])  # each eval set's final loss
    assert float(row["bpb_again"]) == pytest.approx(last["eval/again/bpb"]) and float(row["bpb"]) > 0
    assert float(row["exact_match_counting"]) == last["eval/counting/exact_match"]  # train.evals' final metric
  # The branch restarts from the long run's step 3 and reproduces the 4-step run trained from scratch.
  assert [r["step"] for r in metrics_lib.read_metrics(sub["short"])] == [4]
  assert float(rows["short"]["loss"]) == pytest.approx(float(rows["alone"]["loss"]), rel=1e-5)
  assert rows["short"]["flags"] == "wsd;branch:long@3"
  # The source stopped at step 3 for the branch kept the schedule of its 8 steps (a stop, not a budget).
  long_cfg = config_lib.from_json(open(os.path.join(sub["long"], "config.json")).read())
  schedule = optim.make_schedule(long_cfg)
  logged = [r["lr"] for r in metrics_lib.read_metrics(sub["long"])]
  assert logged == pytest.approx([float(schedule(s)) for s in range(8)], rel=1e-6) and logged[-1] < logged[0]
  assert float(rows["short"]["C_spent"]) == pytest.approx(float(rows["short"]["C"]) / 4)
  assert float(rows["long"]["C_spent"]) == float(rows["long"]["C"])
  assert os.path.exists(os.path.join(workdir, "curves.csv"))
  # lm eval --record adds a run's downstream metrics to results.csv; the report plots each against compute.
  assert (
    cli.main(["eval", "--workdir", sub["long"], "--tasks", "kv_recall", "--limit", "10", "--shots", "0", "--record"])
    == 0
  )
  assert (
    cli.main(["eval", "--workdir", sub["long"], "--tasks", "counting", "--limit", "5", "--shots", "2", "--record"]) == 0
  )
  recorded = [json.loads(line) for line in open(os.path.join(sub["long"], "evals.jsonl"))]
  rows = read_rows(sweep.aggregate(workdir))
  assert float(rows["long"]["acc_kv_recall"]) == recorded[0]["acc"] and rows["short"]["acc_kv_recall"] == ""
  assert float(rows["long"]["exact_match_counting_2shot"]) == recorded[1]["exact_match"]
  table = report.read_rows(os.path.join(workdir, "results.csv"))
  assert report.downstream_columns(table) == [
    "exact_match_counting",
    "acc_kv_recall",
    "acc_norm_kv_recall",
    "exact_match_counting_2shot",
  ]
  (png, svg) = report.downstream_figure(table, "acc_kv_recall", epath.Path(tmp_path / "figures"))
  assert png.endswith("downstream_acc_kv_recall.png") and os.path.getsize(png) > 10_000

  calls.clear()
  sweep.run_sweep(exp, workdir, progress=False)
  assert calls == []
  os.remove(os.path.join(sub["alone"], "result.json"))  # an unfinished point resumes; the rest are skipped
  rows = read_rows(sweep.run_sweep(exp, workdir, progress=False))
  assert calls == [sub["alone"]] and len(rows) == 4 and "resumed" in rows["alone"]["flags"]


def test_print_commands_one_per_invocation_in_order(tmp_path, text_corpus, capsys):
  exp = write_experiment(tmp_path, text_corpus)
  assert cli.main(["sweep", "--config", exp, "--workdir", "runs/s", "--print-commands", "--config.train.seed=3"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split("--workdir ")[1].split()[0] for line in lines] == [
    f"runs/s/{n}" for n in ("long", "short", "long", "alone", "moe")
  ]
  assert all(line.startswith(f"lm train --config {exp} ") and line.endswith("--config.train.seed=3") for line in lines)
  assert "--config.train.stop_at_step=3" in lines[0] and "stop_at_step" not in lines[2]
  assert "--config.train.init_from=runs/s/long/checkpoints/3" in lines[1]


def test_cooldown_start_is_where_the_wsd_schedule_leaves_its_peak():
  cfg = config_lib.default_config()
  for key, value in {"optim.schedule": "wsd", "train.steps": 50, "optim.cooldown_fraction": 0.2}.items():
    config_lib.set_key(cfg, key, value)
  schedule, start = optim.make_schedule(cfg), sweep.cooldown_start(cfg)
  assert (
    start == 40 and float(schedule(start)) == pytest.approx(cfg.optim.lr) and float(schedule(start + 1)) < cfg.optim.lr
  )


def test_cooldown_branches_of_an_isoflop_grid_form_a_valid_plan(tmp_path):
  base = config_lib.default_config()
  config_lib.set_key(base, "tokenizer.kind", "byte")
  vocab = accounting.vocab_size(base)
  shapes = sweep.size_ladder([2e5, 6e5], vocab, aspect=32, head_dim=32)
  points = sweep.cooldown_branches(sweep.isoflop_grid(base, [1e13, 2e13, 4e13], shapes, vocab))
  exp = tmp_path / "grid.py"
  exp.write_text(
    "from lm.config import default_config\n\n\ndef get_config():\n  c = default_config()\n"
    "  c.tokenizer.kind = 'byte'\n  return c\n\n\n"
    f"def get_sweep():\n  return {points!r}\n"
  )
  loaded = sweep.load_sweep(str(exp), workdir="W")
  sources = [p for _, _, p in loaded if "branch_of" not in p]
  assert len(sources) == 2 and all(p["id"].startswith("C4e13") for p in sources)
  for _, cfg, point in loaded:
    if "branch_of" in point:
      assert cfg.train.init_from == f"W/{point['branch_of']}/checkpoints/{sweep.cooldown_start(cfg)}"
  runs = sweep.plan(loaded)
  assert len(runs) == 2 * (1 + 2 * 2)  # per source: two (segment, branch) pairs, then the rest of the source
  assert [r.stop_step is not None for r in runs[:2]] == [True, False]


def test_branch_errors_are_user_errors(tmp_path):
  path = tmp_path / "bad.py"
  for point, message in (
    ({"branch_of": "missing"}, "the source must be a point"),
    ({"branch_of": "a", "model.n_layers": 3}, "may differ from its source in train.steps only"),
    ({"branch_of": "a", "train.steps": 4}, "outside the source's constant-lr phase"),
  ):
    path.write_text(
      "from lm.config import default_config\n\n\ndef get_config():\n  c = default_config()\n"
      "  c.optim.schedule = 'wsd'\n  c.optim.warmup_steps = 4\n  return c\n\n\n"
      f"def get_sweep():\n  return [{{'id': 'a', 'train.steps': 20}}, {{'id': 'b', **{point!r}}}]\n"
    )
    with pytest.raises(UserError, match=message):
      sweep.load_sweep(str(path))


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


@pytest.mark.parametrize(
  "name, devices, budgets", [("isoflop_tpu", 256, [1e17, 1e18, 1e19, 1e20]), ("isoflop_cpu", 2, [1e12, 2.2e12, 5e12])]
)
def test_isoflop_experiment_plans_are_valid_and_spend_each_budget(name, devices, budgets, capsys):
  path = os.path.join(REPO, "experiments", f"{name}.py")
  points = sweep.load_sweep(path, workdir="W")
  by_budget = {}
  for point_id, cfg, _ in points:
    config_lib.validate(cfg, num_devices=devices)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    budget = float(point_id.split("_")[0][1:])
    assert accounting.training_flops(cfg, tokens) == pytest.approx(budget, rel=0.01), point_id
    assert cfg.optim.warmup_steps < cfg.train.steps
    by_budget.setdefault(budget, []).append(point_id)
  assert sorted(by_budget) == budgets and all(len(v) >= (3 if devices > 2 else 4) for v in by_budget.values())
  assert any(cfg.train.init_from for _, cfg, _ in points)  # cooldown branches
  assert cli.main(["sweep", "--config", path, "--workdir", "W", "--print-commands"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == len(sweep.plan(points))


def test_points_share_a_tokenizer_unless_they_start_from_another_run(tmp_path):
  cfg = config_lib.default_config()
  earlier = tmp_path / "a"
  earlier.mkdir()
  (earlier / "config.json").write_text(config_lib.to_json(cfg))
  (earlier / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
  (earlier / "tokenizer.model").write_bytes(b"pieces of a")
  sweep._share_tokenizer(epath.Path(tmp_path), epath.Path(tmp_path / "b"), cfg)
  assert (tmp_path / "b" / "tokenizer.model").read_bytes() == b"pieces of a"
  source = tmp_path / "elsewhere"
  source.mkdir()
  (source / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
  (source / "tokenizer.model").write_bytes(b"pieces of the source")
  for init_from in (str(source), f"{source}/checkpoints/40"):  # a run or a branch: lm train copies the source's
    cfg.train.init_from = init_from
    sweep._share_tokenizer(epath.Path(tmp_path), epath.Path(tmp_path / "c"), cfg)
    assert not (tmp_path / "c" / "tokenizer.json").exists()


def test_a_point_that_started_from_another_run_lends_no_tokenizer(tmp_path):
  # A study's SFT stage names the default corpus in data.source, but its tokenizer is the one of the run it
  # started from, pre-trained on another corpus: a later pre-training on the default corpus trains its own.
  cfg = config_lib.default_config()
  sft = tmp_path / "sft_p1"
  sft.mkdir()
  sft_cfg = config_lib.default_config()
  sft_cfg.train.init_from = str(tmp_path / "base_p1")
  (sft / "config.json").write_text(config_lib.to_json(sft_cfg))
  (sft / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
  (sft / "tokenizer.model").write_bytes(b"pieces of another corpus")
  sweep._share_tokenizer(epath.Path(tmp_path), epath.Path(tmp_path / "base_p64"), cfg)
  assert not (tmp_path / "base_p64" / "tokenizer.json").exists()
