import pytest
from flops_test import xla_training_flops

from lm import config as config_lib
from lm import flops
from lm.model import ModelConfig
from lm.scaling import accounting


def test_accounting_default_matches_training_loop_and_xla():
  cfg = config_lib.default_config()
  config_lib.set_key(cfg, "tokenizer.kind", "byte")
  config_lib.set_key(cfg, "data.seq_len", 64)
  acc = accounting.accounting(cfg)
  assert acc["convention"] == cfg.train.flops_convention == "6N+attn"
  model_cfg = ModelConfig.from_config(cfg, accounting.vocab_size(cfg))
  assert acc["flops_per_token"]["6N+attn"] == flops.flops_per_token(model_cfg, 64)
  measured = xla_training_flops(model_cfg, 2, 64)
  assert accounting.training_flops(cfg, 2 * 64) / measured == pytest.approx(1.0, abs=0.1)


def test_conventions_with_and_without_head_and_causal_half():
  cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128)
  counts = flops.param_counts(cfg)
  attn = 12 * 2 * 100 * 64
  assert counts["total"] == counts["non_embedding"] + counts["embedding"] + counts["head"]
  expected = {
    "6N": 6 * counts["flop_params"],
    "6N+attn": 6 * counts["flop_params"] + attn,
    "6N+attn_causal": 6 * counts["flop_params"] + attn / 2,
    "6N_nohead": 6 * counts["non_embedding"],
    "6N_nohead+attn": 6 * counts["non_embedding"] + attn,
    "6N_nohead+attn_causal": 6 * counts["non_embedding"] + attn / 2,
  }
  assert {c: flops.flops_per_token(cfg, 100, c) for c in flops.CONVENTIONS} == expected
