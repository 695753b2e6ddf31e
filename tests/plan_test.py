"""`lm plan` and `lm sweep --plan`: libtpu compiles the real train step for TPU topologies on this machine."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from lm import cli, flops, plan, plan_search
from lm.errors import UserError
from lm.model import ModelConfig
from lm.scaling import accounting

from conftest import REPO, tiny_config

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="lm plan compiles with libtpu, which is not installed"
)

SLICE = "v5e:2x4"  # 8 chips, one device each
EXPERIMENT = """
from lm.config import default_config


def get_config():
  c = default_config()
  c.tokenizer.kind = "byte"
  c.data.seq_len = 32
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 64
  c.train.batch_size = 8
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c


def get_sweep():
  return [
    {"id": "short", "train.steps": 10},
    {"id": "long", "train.steps": 40, "optim.lr": 1e-3},  # the same program as `short`
    {"id": "huge", "model.d_model": 16384, "model.n_layers": 8, "model.n_heads": 128, "model.d_ff": 262144},
  ]
"""


@pytest.fixture(scope="module")
def planner():
  return plan.Planner(SLICE)


@pytest.fixture(scope="module")
def fsdp_plan(planner):
  cfg = tiny_config(**{"mesh.fsdp": -1, "train.steps": 1000})
  return cfg, planner.plan(cfg)


def write_experiment(tmp_path) -> str:
  path = tmp_path / "exp.py"
  path.write_text(EXPERIMENT)
  return str(path)


def plan_command(*argv: str) -> argparse.Namespace:
  """`lm plan ARGV` parsed by the parser `lm.plan.add_parser` adds."""
  parser = argparse.ArgumentParser()
  plan.add_parser(parser.add_subparsers(dest="command"))
  return parser.parse_args(["plan", *argv])


def test_reports_sharded_memory_compiled_flops_mfu_and_chip_hours(fsdp_plan):
  cfg, r = fsdp_plan
  counts = flops.param_counts(ModelConfig.from_config(cfg, accounting.vocab_size(cfg)))
  assert (r["chips"], r["devices"], r["mesh"]) == (8, 8, {"data": 1, "expert": 1, "fsdp": 8, "tensor": 1})
  memory = r["memory_per_device"]
  assert memory["params"] == counts["total"] * 4 / 8  # f32, every parameter split 8 ways over fsdp
  assert memory["optimizer"] == pytest.approx(2 * memory["params"], rel=0.01)  # AdamW's mu and nu, f32
  parts = memory["params"] + memory["optimizer"] + memory["temporaries"] + memory["other"]
  assert memory["total"] == parts and memory["other"] > 0 and memory["temporaries"] >= 0
  assert r["fits"] and memory["total"] <= memory["hbm"] == 16 * 2**30
  assert r["flops_per_device"] > 0 and r["flops_per_step"] == 8 * r["flops_per_device"]
  assert r["flops_per_step"] == pytest.approx(r["model_flops_per_step"], rel=0.25)  # the whole train step
  tokens = cfg.train.batch_size * cfg.data.seq_len
  assert r["model_flops_per_step"] == flops.flops_per_token(ModelConfig.from_config(cfg, 264), 32) * tokens
  assert r["step_s"] > 0 and 0 < r["mfu"] <= 1
  assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / (r["step_s"] * 8 * 197e12))
  assert r["tokens_per_s"] == pytest.approx(tokens / r["step_s"])
  assert r["steps"] == 1000 and r["chip_hours"] == pytest.approx(1000 * r["step_s"] * 8 / 3600)
  text = plan.format_report(r)
  assert "fits" in text and "MFU" in text and "chip-hours" in text


def test_scanned_layers_and_accumulation_count_every_iteration(planner, fsdp_plan):
  # XLA counts a loop body once: 4 scanned layers x 2 microbatches must cost what 4 x 2 unrolled ones do.
  _, unrolled = fsdp_plan
  overrides = {"mesh.fsdp": -1, "model.scan_layers": True, "model.n_layers": 4}
  r = planner.plan(tiny_config(**overrides, **{"train.batch_size": 16, "optim.grad_accum_steps": 2}))
  assert "extrapolated" in r["cost_from"]
  ratio = r["flops_per_step"] / r["model_flops_per_step"]
  assert ratio == pytest.approx(unrolled["flops_per_step"] / unrolled["model_flops_per_step"], rel=0.05)
  assert r["step_s"] > 2 * unrolled["step_s"]


def test_planned_steps_honour_budgets_and_stops():
  cfg = tiny_config(**{"train.steps": 1000, "train.max_tokens": 10 * 8 * 32 + 1})
  assert plan.planned_steps(cfg) == 11
  flops_per_token = accounting.accounting(cfg)["flops_per_token"][cfg.train.flops_convention]
  config = tiny_config(**{"train.steps": 1000, "train.max_flops": 5 * 256 * flops_per_token})
  assert plan.planned_steps(config) == 5
  assert plan.planned_steps(tiny_config(**{"train.steps": 1000, "train.stop_at_step": 3})) == 3


def test_a_config_that_does_not_fit_prints_its_report_then_names_its_largest_buffers(tmp_path, capsys):
  big = ["model.d_model=2048", "model.n_heads=16", "model.n_kv_heads=16", "model.d_ff=8192", "model.n_layers=1"]
  args = plan_command("--config", write_experiment(tmp_path), "--topology", "v5e:1x1", "--json")
  with pytest.raises(UserError) as caught:  # lm.cli prints it as one line and exits with status 2
    plan.run(args, [*big, "train.batch_size=64", "data.seq_len=2048"])
  message = str(caught.value)
  assert "does not fit v5e:1x1" in message and "\n" not in message
  report = json.loads(capsys.readouterr().out)
  assert not report["fits"] and "ran out of HBM" in report["does_not_fit"]
  # The one-line error quotes libtpu's own figure, e.g. "HLO temporaries (22.68G) exceeds available HBM (15.75G)".
  needed = float(re.search(r"temporaries \((\d+\.\d+)G\)", report["does_not_fit"]).group(1))
  assert 16 < needed < 40
  assert "params/layer_0/mlp/w_" in message and f"needs {needed:.2f} GiB per chip" in message
  assert report["largest_buffers"][0]["bytes"] == 2048 * 8192 * 4


def test_unknown_topologies_are_one_line_errors_with_examples(tmp_path):
  exp = write_experiment(tmp_path)
  for name in ("v5p-32", "v9x:2x2", "v5p:2x2", "v6e:2x3"):  # a Cloud type, a generation, a shape, libtpu's no
    with pytest.raises(UserError, match="v5p:2x2x4") as caught:
      plan.run(plan_command("--config", exp, "--topology", name), [])
    assert "\n" not in str(caught.value)


def test_chip_table_agrees_with_the_mfu_peaks_of_lm_flops():
  for generation, chip in plan.CHIPS.items():
    if generation in flops.TPU_PEAK_FLOPS:
      assert chip.peak_flops == flops.TPU_PEAK_FLOPS[generation]


def test_libtpu_starts_quietly_without_taking_its_lock_file():
  code = "from lm import plan; print(len(plan.topology_devices('v5e:2x4')))"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "ALLOW_MULTIPLE"))}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=False)
  assert (out.returncode, out.stdout, out.stderr) == (0, "8\n", "")


def test_sweep_plan_tables_every_point_shares_compiles_and_exits_2_if_one_does_not_fit(tmp_path, capsys):
  argv = ["sweep", "--config", write_experiment(tmp_path), "--plan", "--topology", SLICE, "--no-progress"]
  assert cli.main(argv) == 2
  out, err = capsys.readouterr()
  lines = out.splitlines()
  rows = {line.split()[0]: line.split() for line in lines[1:-1]}
  assert list(rows) == ["short", "long", "huge"]
  assert (rows["short"][2], rows["long"][2], rows["huge"][2]) == ("10", "40", "200")
  assert "NO" in rows["huge"] and rows["huge"][-1] == "-"  # too big to compile: no step time or chip-hours
  hours = float(rows["short"][-1]), float(rows["long"][-1])
  assert hours[1] == pytest.approx(4 * hours[0], rel=0.01) and 0 < float(rows["short"][-2].rstrip("%")) <= 100
  total = lines[-1]
  assert "for the 2 of 3 points that fit" in total and "(programs compiled: 1)" in total  # short and long share
  assert float(total.split()[1]) == pytest.approx(sum(hours), rel=0.01)
  assert "1 of 3 sweep points do not fit v5e:2x4: huge" in err


def test_an_moe_config_plans_with_experts_split_over_the_expert_axis():
  # On v5p: top_k's values would take a scatter-add gradient, which v5p offloads to its SparseCores and XLA's cost
  # model then prices at about -2 s; the router takes the chosen probabilities by a one-hot product instead.
  planner = plan.Planner("v5p:2x2x2")
  moe = {"model.moe.experts": 8, "model.moe.top_k": 2, "model.moe.d_ff": 64, "mesh.data": 1}
  split = planner.plan(tiny_config(**moe, **{"mesh.expert": 4, "mesh.fsdp": 2}))
  assert split["step_s"] > 0 and 0 < split["mfu"] < 1
  replicated = planner.plan(tiny_config(**{**moe, "mesh.data": 4, "mesh.fsdp": 2}))  # experts split over fsdp only
  assert split["mesh"] == {"data": 1, "expert": 4, "fsdp": 2, "tensor": 1} and split["fits"]
  counts = split["params"]
  assert counts["active"] < counts["total"] and counts["flop_params"] < counts["flop_params_total"]
  # MFU counts the active parameters' FLOPs; the compiled step also runs the dispatch einsums and empty slots.
  assert split["model_flops_per_step"] == pytest.approx(
    accounting.accounting(tiny_config(**moe))["flops_per_token"]["6N+attn"] * 8 * 32
  )
  assert split["flops_per_step"] > split["model_flops_per_step"] and split["mfu"] > 0
  assert "active" in plan.format_report(split)
  # The experts, most of the parameters, split 4 more ways over `expert`: 8 experts of 3 x 32 x 64 per layer.
  expert_bytes = 2 * 8 * 3 * 32 * 64 * 4 / 2  # f32, over fsdp=2
  saved = replicated["memory_per_device"]["params"] - split["memory_per_device"]["params"]
  assert saved == expert_bytes * 3 / 4


SPLASH = {"data.seq_len": 512, "model.d_model": 64, "model.dtype": "bfloat16", "mesh.fsdp": -1, "train.batch_size": 8}


def test_splash_attention_compiles_for_tpu_and_its_kernels_are_counted_not_left_out(planner):
  # Attention is a large share of this step (512 tokens at d_model 64). XLA's cost model counts no FLOPs inside
  # the Pallas kernel's custom call: without the formula the splash step would count less than half the XLA one's.
  splash = planner.plan(tiny_config(**SPLASH))  # model.attention=auto: splash on a TPU for 512 = 4 x 128 tokens
  xla = planner.plan(tiny_config(**SPLASH, **{"model.attention": "xla"}))
  assert (splash["attention"], xla["attention"], xla["kernel_cost"]) == ("splash", "xla", None)
  kernel = splash["kernel_cost"]
  assert kernel["rows_per_device"] == 1 and kernel["heads_per_device"] == 4  # 8 rows over fsdp=8
  per_layer = flops.flops_per_token(ModelConfig.from_config(tiny_config(**SPLASH), 264), 512)  # 6N + attention
  assert kernel["flops_per_device"] > 0.2 * per_layer * 512  # a sizeable share of the step, included below
  # The kernels recompute q k^T in the backward pass (9 matmuls per block pair; lm's XLA path keeps the weights
  # and runs 6), so the splash step counts more FLOPs, not fewer; without the kernels it would count far fewer.
  assert xla["flops_per_device"] < splash["flops_per_device"] < 1.5 * xla["flops_per_device"]
  assert splash["flops_per_device"] - kernel["flops_per_device"] < 0.8 * xla["flops_per_device"]
  assert splash["step_s"] > kernel["seconds"] > 0 and "by formula" in splash["cost_from"]
  assert "splash kernels" in plan.format_report(splash)


def test_search_candidates_hold_the_global_batch_and_come_most_promising_first():
  cfg = tiny_config(**{"train.batch_size": 16})
  found = plan_search.candidates(cfg, 8)
  assert found[0].overrides == {
    "mesh.data": 1,
    "mesh.fsdp": 8,
    "mesh.tensor": 1,
    "model.remat": "none",
    "optim.grad_accum_steps": 1,
    "model.scan_layers": True,
  }
  for c in found:
    o = c.overrides
    assert o["mesh.data"] * o["mesh.fsdp"] * o["mesh.tensor"] == 8 and 4 % o["mesh.tensor"] == 0  # 4 heads
    assert (16 // o["optim.grad_accum_steps"]) % (o["mesh.data"] * o["mesh.fsdp"]) == 0
  assert {c.overrides["model.remat"] for c in found} == set(plan_search.REMATS)
  # 16 rows over 8 data-parallel devices accumulate at most 2 microbatches; over 2 (tensor 4), at most 8.
  assert {c.overrides["optim.grad_accum_steps"] for c in found} == {1, 2, 4, 8}


def test_search_plans_the_configured_layout_first():
  cfg = tiny_config(**{"train.batch_size": 16, "model.remat": "full", "optim.grad_accum_steps": 2})
  cfg.mesh.data, cfg.mesh.fsdp = 2, -1
  found = plan_search.candidates(cfg, 8)
  assert found[0].overrides == {
    "mesh.data": 2,
    "mesh.fsdp": 4,
    "mesh.tensor": 1,
    "model.remat": "full",
    "optim.grad_accum_steps": 2,
    "model.scan_layers": cfg.model.scan_layers,
  }
  assert len(found) == len(plan_search.candidates(tiny_config(**{"train.batch_size": 16}), 8))  # reordered only


def test_search_pruning_rules():
  found = plan_search.candidates(tiny_config(**{"train.batch_size": 16}), 8)
  group = [c for c in found if c.group == (1, 2, 4, True)]  # data 1, fsdp 2, tensor 4, scanned: accumulation 1-8
  by_knobs = {(c.overrides["model.remat"], c.accum): c for c in group}
  too_big = by_knobs[("dots", 2)]
  too_big.report, too_big.status = {"fits": False}, "planned"
  plan_search.prune(found, too_big)
  assert by_knobs[("none", 1)].status == by_knobs[("none", 2)].status == by_knobs[("dots", 1)].status == "pruned"
  assert by_knobs[("full", 2)].status == by_knobs[("dots", 4)].status == "pending"
  # Fewer fsdp shards at the same tensor split hold more state: data 2 x fsdp 1 x tensor 4 is out too.
  scanned = [c for c in found if c.overrides["model.scan_layers"]]
  meshes = {(c.overrides["mesh.data"], c.overrides["mesh.tensor"], c.remat, c.accum): c for c in scanned}
  assert meshes[(2, 4, 1, 2)].status == "pruned" and meshes[(1, 2, 0, 1)].status == "pending"  # remat 1: dots
  fits = by_knobs[("dots_no_batch", 4)]
  fits.report, fits.status = {"fits": True}, "planned"
  plan_search.prune(found, fits)
  assert by_knobs[("full", 4)].status == by_knobs[("full", 8)].status == "pruned"
  assert "which fits" in by_knobs[("full", 8)].why
  assert by_knobs[("full", 2)].status == "pending" and by_knobs[("dots_no_batch", 2)].status == "pending"
  twin = {**fits.overrides, "model.scan_layers": False}
  assert next(c for c in found if c.overrides == twin).status == "pruned"  # costs the same, compiles longer


def test_plan_search_in_compile_processes_prints_the_fastest_fit_and_a_rerun_compiles_nothing(
  tmp_path, capsys, fsdp_plan
):
  exp = write_experiment(tmp_path)
  argv = ["plan", "--config", exp, "--topology", SLICE, "--search", "--max-candidates", "2"]
  argv += ["--cache-dir", str(tmp_path / "cache"), "--json", "--config.model.n_layers=1"]
  assert cli.main([*argv, "--jobs", "2"]) == 0
  first = json.loads(capsys.readouterr().out)
  planned = first["candidates"]
  assert len(planned) == 2 and first["compiled"] == 2 and not any(c["cached"] for c in planned)
  speeds = [c["tokens_per_s"] for c in planned if c["fits"]]
  assert speeds == sorted(speeds, reverse=True) and all(c["mfu"] > 0 and c["compile_s"] > 0 for c in planned)
  best = first["best"]
  assert best["overrides"] == planned[0]["overrides"] and best["tokens_per_s"] == speeds[0]
  _, plain = fsdp_plan
  assert set(plain) <= set(best) and set(best) - set(plain) == {"overrides"}  # plain lm plan --json's keys
  assert len(first["skipped"]) > 0 and all(s["why"] for s in first["skipped"])
  assert cli.main([*argv, "--jobs", "1"]) == 0  # the same search again: every plan from the cache
  again = json.loads(capsys.readouterr().out)
  assert again["compiled"] == 0 and all(c["cached"] for c in again["candidates"])
  assert [c["tokens_per_s"] for c in again["candidates"]] == [c["tokens_per_s"] for c in planned]
  # The table form names the winner as the overrides to paste.
  assert cli.main([a for a in argv if a != "--json"]) == 0
  table = capsys.readouterr().out
  assert table.rstrip().splitlines()[-1] == plan_search.format_overrides(best["overrides"])


def test_sweep_plan_search_picks_a_layout_per_point(tmp_path, capsys):
  exp = write_experiment(tmp_path)
  argv = ["sweep", "--config", exp, "--plan", "--topology", SLICE, "--search", "--max-candidates", "1"]
  argv += ["--jobs", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--config.model.n_layers=1"]
  assert cli.main(argv) == 2  # `huge` fits in no layout, even with one layer
  out = capsys.readouterr().out.splitlines()
  layouts = dict(line.split(": ", 1) for line in out if line.startswith(("short: ", "long: ", "huge: ")))
  assert layouts["short"] == layouts["long"]
  assert layouts["short"].startswith("--config.mesh.data=1 --config.mesh.fsdp=8")
  assert layouts["huge"] == "(no layout fits)"
  assert "(programs compiled: 1)" in out[-4]  # short and long share one program; huge's state alone is too big
