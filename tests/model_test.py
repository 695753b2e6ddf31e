import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import flops
from lm.model import ModelConfig, Transformer, cross_entropy

from conftest import random_batch

V = 97


def make(**kw):
  cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, **kw)
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  return cfg, model, params


def logits(model, params, batch):
  return model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])


def test_output_shape_and_dtype():
  _, model, params = make()
  out = logits(model, params, random_batch(3, 16, V))
  assert out.shape == (3, 16, V) and out.dtype == jnp.float32


def test_causal_future_tokens_do_not_change_past_logits():
  _, model, params = make()
  batch = random_batch(2, 16, V)
  changed = dict(batch, inputs=batch["inputs"].copy())
  changed["inputs"][:, 10:] = (changed["inputs"][:, 10:] + 1) % V
  a, b = logits(model, params, batch), logits(model, params, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert not np.allclose(a[:, 10:], b[:, 10:])


def test_packed_documents_do_not_attend_to_each_other():
  _, model, params = make()
  batch = random_batch(2, 16, V, split=6)
  changed = dict(batch, inputs=batch["inputs"].copy())
  changed["inputs"][:, :6] = (changed["inputs"][:, :6] + 5) % V  # edit only the first document
  a, b = logits(model, params, batch), logits(model, params, changed)
  np.testing.assert_allclose(a[:, 6:], b[:, 6:], atol=1e-6)
  # The second document alone, at positions 0.., gives the same logits as inside the packed row.
  alone = {k: v[:, 6:] for k, v in batch.items()}
  alone["segment_ids"] = np.ones_like(alone["segment_ids"])
  np.testing.assert_allclose(logits(model, params, alone), a[:, 6:], atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_attention_shapes(kv_heads):
  cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=kv_heads, d_ff=64)
  params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  assert params["layer_0"]["attn"]["wk"].unbox().shape == (32, kv_heads, 8)
  assert params["layer_0"]["attn"]["wq"].unbox().shape == (32, 4, 8)


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa_cfg, gqa, gqa_params = make()
  mha_cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64)
  mha_params = jax.tree.map(lambda x: x, gqa_params)
  for i in range(2):
    attn = dict(mha_params[f"layer_{i}"]["attn"])
    for name in ("wk", "wv"):
      w = gqa_params[f"layer_{i}"]["attn"][name]
      attn[name] = w.replace_boxed(jnp.repeat(w.unbox(), 2, axis=1))
    mha_params[f"layer_{i}"] = dict(mha_params[f"layer_{i}"], attn=attn)
  batch = random_batch(2, 16, V)
  np.testing.assert_allclose(
    logits(Transformer(mha_cfg), mha_params, batch), logits(gqa, gqa_params, batch), rtol=1e-5, atol=1e-5
  )


def test_parameters_carry_logical_axis_names():
  _, _, params = make()
  names = {leaf.names for leaf in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "names"))}
  assert ("vocab", "embed") in names
  assert ("embed", "heads", "head_dim") in names
  assert ("embed", "mlp") in names


def test_tied_embeddings_have_no_head():
  _, _, params = make(tie_embeddings=True)
  assert "head" not in params and "embed" in params


def test_scan_and_remat_compute_the_same_function():
  cfg, model, params = make()
  scan_cfg = ModelConfig(**{**cfg.__dict__, "scan_layers": True, "remat": "full"})
  scan_model = Transformer(scan_cfg)
  unboxed = nn.unbox(params)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[unboxed[f"layer_{i}"] for i in range(2)])
  scan_params = {k: v for k, v in unboxed.items() if not k.startswith("layer_")} | {"layers": stacked}
  batch = random_batch(2, 16, V)
  np.testing.assert_allclose(
    logits(scan_model, scan_params, batch),
    logits(model, params, batch),
    rtol=1e-5,
    atol=1e-5,
  )


def test_bf16_compute_stays_close_to_f32():
  _, model, params = make()
  _, bf16_model, _ = make(dtype="bfloat16")
  batch = random_batch(2, 16, V)
  a, b = logits(model, params, batch), logits(bf16_model, params, batch)
  assert b.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(a - b))) < 0.1 * float(jnp.max(jnp.abs(a)))


def test_bf16_params_are_stored_in_f32_and_used_rounded_to_bf16():
  _, model, params = make()
  _, bf16_model, bf16_params = make(param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.float32)}
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(bf16_params), nn.unbox(params))  # the same f32 init
  rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), nn.unbox(params))
  batch = random_batch(2, 16, V)
  np.testing.assert_array_equal(logits(bf16_model, nn.unbox(params), batch), logits(model, rounded, batch))
  grads = jax.grad(lambda p: jnp.sum(logits(bf16_model, p, batch)))(nn.unbox(params))
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_cross_entropy_matches_log_softmax_and_z_loss():
  logits_BxTxV = jax.random.normal(jax.random.key(1), (2, 3, 11))
  targets = jnp.array([[1, 2, 3], [4, 5, 10]])
  loss, log_z = cross_entropy(logits_BxTxV, targets)
  expected = -jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  with_z, _ = cross_entropy(logits_BxTxV, targets, z_loss=1e-2)
  np.testing.assert_allclose(with_z, expected + 1e-2 * log_z**2, rtol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_param_counts_match_the_model(tie):
  cfg, _, params = make(tie_embeddings=tie)
  actual = sum(x.size for x in jax.tree.leaves(params))
  counts = flops.param_counts(cfg)
  assert counts["total"] == actual
  assert counts["embedding"] == V * 32


def test_causal_query_blocks_give_dense_attention_and_its_gradients():
  """Three 128-query blocks over packed rows, with two query heads per kv head, against a dense
  softmax(q k^T) v that JAX differentiates itself."""
  from lm import model as model_lib  # noqa: PLC0415

  b, k, g, t, e = 2, 2, 2, 384, 8
  assert model_lib.query_blocks(t) == [(0, 128), (128, 256), (256, 384)]
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (b, k, g * t, e))
  kk, v = jax.random.normal(keys[1], (b, k, t, e)), jax.random.normal(keys[2], (b, k, t, e))
  segments = np.ones((b, t), np.int32)
  segments[0, 200:] = 2  # a document boundary inside the second block
  mask = model_lib.attention_mask(jnp.asarray(segments))
  cotangent = jax.random.normal(keys[3], q.shape)

  def dense(q, kk, v):
    logits = jnp.einsum("bkgte,bkse->bkgts", q.reshape(b, k, g, t, e), kk)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("bkgts,bkse->bkgte", probs, v).reshape(q.shape)

  def blocked(q, kk, v):
    return model_lib._attend(q, kk, v, mask, "float32")

  out, vjp = jax.vjp(blocked, q, kk, v)
  out_dense, vjp_dense = jax.vjp(dense, q, kk, v)
  np.testing.assert_allclose(out, out_dense, atol=2e-5)
  for grad, grad_dense in zip(vjp(cotangent), vjp_dense(cotangent), strict=True):
    np.testing.assert_allclose(grad, grad_dense, atol=2e-4)


@pytest.mark.parametrize("length", [48, 21])  # 4 chunks of 12 positions; 3 chunks of 7 (4 does not divide 21)
def test_chunked_head_loss_equals_the_full_logits_loss_and_its_gradients(length):
  from lm.model import head_loss  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (3, length, 16))
  head = jax.random.normal(keys[1], (16, V)) * 0.5
  targets = jax.random.randint(keys[2], (3, length), 0, V)
  weights = (jax.random.uniform(keys[3], (3, length)) > 0.3).astype(jnp.float32)  # masked positions too
  z = 1e-2

  def full(x, head):
    loss, _ = cross_entropy(jnp.einsum("btd,dv->btv", x, head), targets, z)
    ce, _ = cross_entropy(jnp.einsum("btd,dv->btv", x, head), targets)
    return jnp.sum(loss * weights), jnp.sum(ce * weights)

  def chunked(x, head):
    return head_loss(x, head, targets, weights, z, "float32")

  (objective, ce), grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(x, head)
  (objective_full, ce_full), grads_full = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(x, head)
  np.testing.assert_allclose(objective, objective_full, rtol=1e-5)
  np.testing.assert_allclose(ce, ce_full, rtol=1e-5)
  assert objective > ce > 0
  for grad, grad_full in zip(grads, grads_full, strict=True):
    np.testing.assert_allclose(grad, grad_full, atol=1e-5)
  # The cotangent scales the gradient: 2 * loss has twice its gradient.
  double = jax.grad(lambda x: 2 * chunked(x, head)[0])(x)
  np.testing.assert_allclose(double, 2 * grads[0], atol=1e-5)


def test_chunked_head_loss_gives_bf16_parameters_bf16_gradients():
  from lm.model import head_loss  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (2, 8, 16))
  head = (jax.random.normal(keys[1], (16, V)) * 0.5).astype(jnp.bfloat16)
  targets, weights = jax.random.randint(keys[2], (2, 8), 0, V), jnp.ones((2, 8))
  grad_x, grad_head = jax.grad(lambda x, h: head_loss(x, h, targets, weights, 0.0, "bfloat16")[0], (0, 1))(x, head)
  assert grad_x.dtype == jnp.float32 and grad_head.dtype == jnp.bfloat16
  exact = jax.grad(lambda h: head_loss(x, h, targets, weights, 0.0, "float32")[0])(head.astype(jnp.float32))
  assert float(jnp.max(jnp.abs(grad_head.astype(jnp.float32) - exact))) < 0.05 * float(jnp.max(jnp.abs(exact)))
