from lm import config as config_lib
from lm import flops
from lm.model import ModelConfig
from lm.scaling import accounting
from lm.tokenizer import ByteTokenizer


def test_accounting_records_every_convention_and_the_runs_own():
  # flops_test checks `flops.flops_per_token` (the training loop's count) against XLA's cost analysis.
  cfg = config_lib.default_config()
  config_lib.set_key(cfg, "tokenizer.kind", "byte")
  config_lib.set_key(cfg, "train.flops_convention", "6N_nohead+attn_causal")
  acc = accounting.accounting(cfg)
  model_cfg = ModelConfig.from_config(cfg, ByteTokenizer.vocab_size)
  assert accounting.vocab_size(cfg) == ByteTokenizer.vocab_size and acc["convention"] == "6N_nohead+attn_causal"
  assert acc["params"] == flops.param_counts(model_cfg)
  assert acc["flops_per_token"] == {c: flops.flops_per_token(model_cfg, 128, c) for c in flops.CONVENTIONS}
  assert accounting.training_flops(cfg, 1000) == 1000 * acc["flops_per_token"]["6N_nohead+attn_causal"]
  assert config_lib.default_config().train.flops_convention == "6N+attn"  # the default, tested against XLA
