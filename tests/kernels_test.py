"""Fused attention (`lm.kernels`): the Pallas splash kernel in interpret mode, cuDNN's layouts, the choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import kernels
from lm.errors import UserError
from lm.model import ModelConfig, Transformer, attention_mask

from conftest import run_devices_script

B, T, H, K, E = 2, 256, 4, 2, 32  # two 128-token blocks: the causal block skipping matters


def packed_inputs(seed: int = 0):
  """Pre-scaled q [B, T, H, E], k and v [B, T, K, E], and segment ids of packed rows (with a padding tail)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, H, E)) * E**-0.5, jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, E)), jnp.float32) for _ in range(2))
  segments = np.ones((B, T), np.int32)
  segments[0, 100:] = 2  # a document boundary inside the first block's keys
  segments[1, 130:] = 2  # one inside the second block
  segments[1, 200:] = 0  # padding
  return q, k, v, jnp.asarray(segments)


def reference(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT):
  """Softmax attention with the model's mask, written out: the G = H / K query heads of a group share a kv head."""
  k_BxTxHxE, v_BxTxHxE = (jnp.repeat(x, H // K, axis=2) for x in (k_BxTxKxE, v_BxTxKxE))
  logits_BxHxTxS = jnp.einsum("bthe,bshe->bhts", q_BxTxHxE, k_BxTxHxE)
  logits_BxHxTxS = jnp.where(attention_mask(segment_ids_BxT)[:, None], logits_BxHxTxS, -jnp.inf)
  return jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(logits_BxHxTxS, axis=-1), v_BxTxHxE)


def test_splash_in_interpret_mode_equals_reference_attention_and_its_gradients_with_packing():
  q, k, v, segments = packed_inputs()
  splash = kernels.attention("splash", q, k, v, segments, interpret=True)
  np.testing.assert_allclose(splash, reference(q, k, v, segments), atol=2e-5)

  def loss(fn):
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, E)), jnp.float32)
    return lambda q, k, v: jnp.sum(fn(q, k, v, segments) * weights)

  got = jax.grad(loss(lambda *a: kernels.attention("splash", *a, interpret=True)), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=5e-5, err_msg=f"d{name}")
  # A key in another document changes nothing; in the same one it does.
  moved = k.at[0, 150].add(1.0)  # row 0's second document
  out = kernels.attention("splash", q, moved, v, segments, interpret=True)
  np.testing.assert_array_equal(out[0, :100], splash[0, :100])
  assert not np.allclose(out[0, 150:], splash[0, 150:])


def test_cudnn_path_layouts_and_packing_mask_equal_reference_through_xla():
  # No GPU here: the same call with jax.nn.dot_product_attention's XLA implementation checks the layouts and
  # the mask lm hands it; the accelerator test runs the cuDNN implementation itself.
  q, k, v, segments = packed_inputs(2)
  out = kernels.attention("cudnn", q, k, v, segments, cudnn="xla")
  np.testing.assert_allclose(out, reference(q, k, v, segments), atol=2e-5)


def test_a_splash_model_equals_the_xla_model_forward_and_backward():
  cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=H, n_kv_heads=K, d_ff=96)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, 64, (B, T)))
  _, _, _, segments = packed_inputs()
  positions = jnp.asarray(np.broadcast_to(np.arange(T), (B, T)))
  params = Transformer(cfg).init(jax.random.key(0), tokens, segments, positions)

  def loss(model_cfg):
    return lambda p: jnp.mean(Transformer(model_cfg).apply(p, tokens, segments, positions) ** 2)

  splash_cfg = dataclasses.replace(cfg, attention="splash", kernel_interpret=True)
  np.testing.assert_allclose(loss(splash_cfg)(params), loss(cfg)(params), rtol=1e-5)
  got, want = jax.grad(loss(splash_cfg))(params), jax.grad(loss(cfg))(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-6)


def test_splash_runs_per_shard_under_a_data_and_tensor_mesh():
  # Rows split over data, heads over tensor (the kv heads divide): the sharded kernel equals the reference.
  result = run_devices_script(
    f"""
import json, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import sys; sys.path.insert(0, "tests")
from kernels_test import packed_inputs, reference
from lm import kernels, partitioning
from lm.model import ModelConfig
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 1, 1, 2), partitioning.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
rules = partitioning.rules_for(ModelConfig(vocab_size=64, n_heads={H}, n_kv_heads={K}, d_model={H * E}), mesh)
q, k, v, segments = packed_inputs()
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  batch, heads = kernels.splash_partition(mesh, {H}, {K})
  fn = jax.jit(lambda *a: kernels.attention("splash", *a, interpret=True))
  out = fn(q, k, v, segments)
  text = fn.lower(q, k, v, segments).as_text()
print(json.dumps({{"batch": str(batch), "heads": heads, "shard_map": "shard_map" in text or "manual" in text,
  "error": float(jnp.max(jnp.abs(out - reference(q, k, v, segments))))}}))
""",
    devices=4,
  )
  assert result["heads"] == "tensor" and "data" in result["batch"] and result["shard_map"]
  assert result["error"] < 2e-5


def test_auto_picks_the_kernel_the_devices_and_shapes_allow_and_impossible_choices_are_one_line_errors():
  assert kernels.resolve("auto", "tpu", 2048, "bfloat16", 128) == "splash"
  assert kernels.resolve("auto", "tpu", 100, "bfloat16", 128) == "xla"  # not a multiple of the 128 block
  assert kernels.resolve("auto", "gpu", 100, "bfloat16", 128) == "cudnn"
  assert kernels.resolve("auto", "gpu", 2048, "float32", 128) == "xla"  # cuDNN computes in 16 bits
  assert kernels.resolve("auto", "cpu", 2048, "bfloat16", 128) == "xla"
  assert kernels.resolve("xla", "tpu", 2048, "bfloat16", 128) == "xla"
  for choice, platform, seq_len, dtype, match in [
    ("splash", "cpu", 256, "float32", "runs on TPU, and this run's devices are cpu"),
    ("cudnn", "tpu", 256, "bfloat16", "runs on GPU"),
    ("splash", "tpu", 200, "bfloat16", "multiple of 128, got 200"),
    ("cudnn", "gpu", 256, "float32", "bfloat16 or float16"),
    ("flash", "tpu", 256, "bfloat16", "must be one of"),
  ]:
    with pytest.raises(UserError, match=match) as e:
      kernels.resolve(choice, platform, seq_len, dtype, 64)
    assert "\n" not in str(e.value)


def test_kernel_flops_formula_agrees_with_xla_counting_the_same_attention():
  # One 128-token block: the kernels compute every position; XLA counts the reference's two matmuls.
  cost = kernels.attention_cost(batch=B, heads=H, kv_heads=K, seq_len=128, head_dim=E, itemsize=4)
  q, k, v, segments = (x[:, :128] for x in packed_inputs())
  counted = jax.jit(reference).lower(q, k, v, segments).compile().cost_analysis()["flops"]
  assert cost["forward_flops"] == 4 * B * H * 128 * 128 * E
  assert cost["forward_flops"] == pytest.approx(counted, rel=0.1)
  # Causal blocks: at 4 blocks, 10 of 16 block pairs are computed; the backward pass is 3.5 forwards.
  four = kernels.attention_cost(batch=B, heads=H, kv_heads=K, seq_len=512, head_dim=E, itemsize=4)
  assert four["forward_flops"] == 4 * B * H * 10 * 128 * 128 * E
  assert four["backward_flops"] == 3.5 * four["forward_flops"]
  assert four["forward_bytes"] > 2 * B * H * 512 * E * 4  # at least q in and o out
