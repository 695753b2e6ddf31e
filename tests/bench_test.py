import json
import subprocess
import sys

import pytest

from lm import bench, cli
from lm.errors import UserError

from conftest import REPO, write_experiment


def test_ref_preset_is_the_shared_reference_model():
  cfg = bench.bench_config("ref", [])
  assert (cfg.tokenizer.vocab_size, cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (8192, 256, 4, 4)
  assert (cfg.model.n_kv_heads, cfg.model.d_ff, cfg.data.seq_len, cfg.train.batch_size) == (4, 768, 256, 16)
  assert cfg.model.dtype == "float32" and cfg.optim.clip_norm > 0
  with pytest.raises(UserError, match="unknown preset"):
    bench.bench_config("huge", [])


def test_bench_prints_one_json_line_with_the_contract_keys():
  small = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.tokenizer.vocab_size=512"]
  small.append("--config.model.n_layers=1")  # three programs compile (f32, bf16, profiled); one layer cuts that
  out = subprocess.run(
    [sys.executable, "-m", "lm.cli", "bench", "train", "--preset", "ref", "--steps", "2", "--profile", *small],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  for key in ("tokens_per_s", "step_s", "compile_s", "flops_per_token", "mfu", "peak_rss_mb"):
    assert record[key] > 0, key
  assert record["tokens_per_s"] == pytest.approx(16 * 256 / record["step_s"])
  assert record["mfu"] < 1.0
  # 256 tokens are two query blocks: the step computes 1/4 less attention than 6N+attn counts.
  assert record["flops_per_token_computed"] < record["flops_per_token"]
  assert record["mfu_computed"] == pytest.approx(
    record["mfu"] * record["flops_per_token_computed"] / record["flops_per_token"]
  )
  # bf16 compute runs beside f32 in the same invocation.
  assert record["bf16_tokens_per_s"] == pytest.approx(16 * 256 / record["bf16_step_s"])
  assert record["bf16_vs_f32"] == pytest.approx(record["bf16_tokens_per_s"] / record["tokens_per_s"])
  # The same step in bare jax.numpy (lm.bare) runs beside it.
  assert record["bare_jax_tokens_per_s"] > 0
  assert record["ratio_vs_bare_jax"] == pytest.approx(record["tokens_per_s"] / record["bare_jax_tokens_per_s"])
  # The per-op profile: every kind of op took time, and the matmuls of the layers are named.
  kinds = record["profile"]["op_ms_per_step"]
  assert set(kinds) == {"matmul", "copy/transpose", "elementwise/reduce"} and all(v > 0 for v in kinds.values())
  top = record["profile"]["top_ops_ms_per_step"]
  assert "matmul: fwd Transformer/layer_*/attn/dot_general" in top
  assert any(op.startswith("matmul: bwd Transformer/layer_*/") for op in top)


def test_bench_sample_prints_one_json_line_with_the_rates_and_ratios(tmp_path, capfd):
  from lm import cli

  peer = tmp_path / "peer.py"  # stands in for the Hugging Face peer: its output format, fixed numbers
  rates = {"decode_tokens_per_s": 10.0, "batch8_decode_tokens_per_s": 40.0, "recompute_tokens_per_s": 2.0}
  peer.write_text(f"print({json.dumps(json.dumps(rates))})\n")
  small = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.tokenizer.vocab_size=512"]
  small.append("--config.model.n_layers=1")  # compiling the sampler dominates; one layer halves it
  argv = ["bench", "sample", "--preset", "ref", "--new-tokens", "8", "--profile", "--peer", sys.executable]
  argv += ["--peer-script", str(peer)]
  capfd.readouterr()
  assert cli.main(argv + small) == 0
  lines = capfd.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  rates = ("prefill_tokens_per_s", "decode_tokens_per_s", "recompute_tokens_per_s", "batch8_decode_tokens_per_s")
  for key in rates:
    assert record[key] > 0, key
  assert record["new_tokens"] == 8 and record["params"] > 0
  assert record["cached_vs_recompute"] == pytest.approx(
    record["decode_tokens_per_s"] / record["recompute_tokens_per_s"]
  )
  assert record["batch8_vs_batch1"] == pytest.approx(
    record["batch8_decode_tokens_per_s"] / record["decode_tokens_per_s"]
  )
  assert record["hf_decode_tokens_per_s"] == 10.0 and record["hf_batch8_decode_tokens_per_s"] == 40.0
  assert record["vs_hf_batch1"] == pytest.approx(record["decode_tokens_per_s"] / 10.0)
  assert record["vs_hf_batch8"] == pytest.approx(record["batch8_decode_tokens_per_s"] / 40.0)
  # The batch-8 decode step's profile names the model's matmuls; the loop and cond wrappers, whose
  # trace events span the ops inside them, are not counted twice.
  profile = record["profile_batch8"]
  assert profile["op_ms_per_step"]["matmul"] > 0
  top = profile["top_ops_ms_per_step"]
  assert any(op.startswith("matmul: Transformer/layer_*/") for op in top)
  assert not any(op.split(": ", 1)[1] in ("while", "cond") for op in top)
  # Step times by cache size: a 16-token prompt and 8 new tokens (padded to 16) fill 32 slots.
  by_slots = record["step_ms_by_cache_slots"]
  assert set(by_slots) == {"batch1", "batch8"} and all(set(v) == {"32"} and v["32"] > 0 for v in by_slots.values())


def test_bench_matmul_times_the_step_shapes_and_reports_a_missing_peer():
  record = bench.matmul_speeds(peer=sys.executable, repeats=2, names=("decode_b8_mlp", "train_attention"))
  for name in ("decode_b8_mlp", "train_attention"):
    b, m, k, n = bench.MATMUL_SHAPES[name]
    assert record[name]["shape"] == [b, m, k, n]
    assert record[name]["xla_gflops"] == pytest.approx(2 * b * m * k * n / record[name]["xla_ms"] / 1e6)
    assert 0.1 < record[name]["xla_gflops"] < 2000
  try:
    import torch  # noqa: F401, PLC0415
  except ImportError:  # the test environment: the peer's failure is reported, not raised
    assert "torch" in record["torch_error"]
  else:
    assert record["decode_b8_mlp"]["torch_ms"] > 0


def test_bench_data_times_both_pipelines_from_a_fresh_cache(tmp_path, capsys, text_corpus):
  exp = write_experiment(
    tmp_path / "exp.py",
    **{"data.source": text_corpus, "tokenizer.kind": "byte", "data.seq_len": 32, "train.batch_size": 4},
  )
  assert cli.main(["bench", "data", "--config", exp, "--batches", "5"]) == 0
  record = json.loads(capsys.readouterr().out)
  assert record["train_tokens"] > 10_000 and record["token_file_mb"] == record["train_tokens"] * 2 / 2**20
  for shuffle in ("global", "window"):
    assert record[f"{shuffle}_tokens_per_s"] > 0 and record[f"{shuffle}_first_batch_s"] > 0
  assert cli.main(["bench", "data"]) == 2


def test_bench_rl_reports_rollout_and_update_rates_from_a_real_run(capsys):
  tiny = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64"]
  args = ["bench", "rl", "--preset", "small", "--steps", "3", *[f"--config.{o}" for o in tiny]]
  args.append("--config.train.batch_size=8")
  assert cli.main(args) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record["preset"] == "small" and record["rollouts_timed"] == 3 and record["rollout_rows"] == 16
  assert record["rollout_tokens_per_s"] > 0 and record["update_tokens_per_s"] > 0 and 0 < record["rollout_share"] < 1
  assert record["sampler_compiles"] == 2  # one prefill and one decode loop for every rollout


def test_bench_moe_times_a_dense_model_and_its_twin_of_equal_active_parameters(capsys):
  tiny = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64"]
  args = ["bench", "moe", "--preset", "small", "--steps", "2", "--experts", "4", *[f"--config.{o}" for o in tiny]]
  assert cli.main([*args, "--config.train.batch_size=8", "--config.data.seq_len=32"]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  dense, moe = record["dense"], record["moe"]
  assert record["experts"] == 4 and record["top_k"] == 2
  # Two experts of width 32 are the dense MLP's 64: the same active parameters but for the 4-wide routers.
  assert moe["params_active"] - dense["params_active"] == 2 * 32 * 4
  assert moe["params_total"] - dense["params_total"] == 2 * (32 * 4 + 2 * 3 * 32 * 32)
  assert record["moe_vs_dense_tokens_per_s"] == pytest.approx(moe["tokens_per_s"] / dense["tokens_per_s"])
  assert moe["flops_per_token_computed"] > dense["flops_per_token_computed"]  # empty slots and dispatch einsums
