import jax
import jax.numpy as jnp
import pytest

from lm import flops
from lm.model import ModelConfig, Transformer, cross_entropy

from conftest import random_batch


def xla_training_flops(cfg: ModelConfig, batch: int, length: int) -> float:
  """FLOPs of one forward + backward pass as counted by XLA's compiled cost analysis."""
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"]
  data = random_batch(batch, length, cfg.vocab_size)

  def loss(params):
    logits = model.apply({"params": params}, data["inputs"], data["segment_ids"], data["positions"])
    return jnp.mean(cross_entropy(logits, data["targets"])[0])

  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["flops"]


@pytest.mark.parametrize(
  "cfg, length",
  [
    (ModelConfig(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=384), 128),
    (ModelConfig(vocab_size=512, d_model=128, n_layers=3, n_heads=8, n_kv_heads=2, d_ff=256), 256),
    (ModelConfig(vocab_size=2048, d_model=96, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=256, tie_embeddings=True), 64),
  ],
)
def test_default_convention_matches_xla_cost_analysis(cfg, length):
  batch = 4
  counted = flops.flops_per_token(cfg, length, "6N+attn") * batch * length
  measured = xla_training_flops(cfg, batch, length)
  assert abs(counted / measured - 1) < 0.10, (counted, measured)


def test_conventions_with_and_without_head_and_causal_half():
  cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128)
  counts = flops.param_counts(cfg)
  attn = 12 * 2 * 100 * 64  # 2 layers, 100 keys, d_model 64
  expected = {
    "6N": 6 * counts["flop_params"],
    "6N+attn": 6 * counts["flop_params"] + attn,
    "6N+attn_causal": 6 * counts["flop_params"] + attn / 2,
    "6N_nohead": 6 * counts["non_embedding"],
    "6N_nohead+attn": 6 * counts["non_embedding"] + attn,
    "6N_nohead+attn_causal": 6 * counts["non_embedding"] + attn / 2,
  }
  assert {c: flops.flops_per_token(cfg, 100, c) for c in flops.CONVENTIONS} == expected
  with pytest.raises(ValueError, match="unknown FLOP convention"):
    flops.flops_per_token(cfg, 100, "5N")


def test_param_count_split():
  cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  counts = flops.param_counts(cfg)
  assert counts["total"] == counts["non_embedding"] + counts["embedding"] + counts["head"]
  assert counts["head"] == 1000 * 64
  assert counts["flop_params"] == counts["non_embedding"] + 1000 * 64


def test_measured_matmul_peak_is_plausible():
  peak = flops.measure_matmul_flops("float32", n=256, seconds=0.1)
  assert 1e8 < peak < 1e14
