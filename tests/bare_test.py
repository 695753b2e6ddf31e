import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import bare
from lm.model import ModelConfig, Transformer, head_loss

from conftest import random_batch

V, B, T = 97, 3, 16


def setup(n_layers=2):
  # Grouped-query attention (4 heads over 2 kv heads), so the bare version's GQA is checked too.
  cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=64)
  model = Transformer(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])
  return cfg, model, params, random_batch(B, T, V)


def lm_loss(model, params, batch):
  """The train step's loss: lm.model's layers, custom VJPs and chunked head loss."""
  x, head = model.apply(
    {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], return_hidden=True
  )
  objective, _ = head_loss(x, head, batch["targets"], batch["loss_mask"], 0.0, "float32")
  return objective / batch["loss_mask"].sum()


def test_bare_loss_and_gradients_match_the_model():
  cfg, model, params, batch = setup()
  ours, our_grads = jax.value_and_grad(lm_loss, argnums=1)(model, params, batch)
  theirs, bare_grads = jax.value_and_grad(bare.loss)(params, batch["inputs"], batch["targets"], cfg.n_layers)
  np.testing.assert_allclose(theirs, ours, rtol=1e-5)
  # Plain autodiff of the bare version against lm.model's hand-written backward passes.
  for path, g in jax.tree_util.tree_leaves_with_path(bare_grads):
    ours_g = our_grads
    for key in path:
      ours_g = ours_g[key.key]
    np.testing.assert_allclose(g, ours_g, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bare_step_is_optax_adamw_after_clipping():
  cfg, _, params, batch = setup(n_layers=1)
  kw = {"lr": 1e-2, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
  step = bare.make_step(cfg.n_layers, clip_norm=0.5, **kw)
  tx = optax.chain(
    optax.clip_by_global_norm(0.5),
    optax.adamw(kw["lr"], b1=kw["b1"], b2=kw["b2"], eps=kw["eps"], weight_decay=kw["weight_decay"]),
  )
  ref_params, ref_opt = params, tx.init(params)
  grad_fn = jax.jit(jax.value_and_grad(bare.loss), static_argnums=3)
  ours, opt, losses = jax.tree.map(jnp.array, params), bare.init_opt(params), []
  for _ in range(3):
    value, grads = grad_fn(ref_params, batch["inputs"], batch["targets"], cfg.n_layers)
    updates, ref_opt = tx.update(grads, ref_opt, ref_params)
    ref_params = optax.apply_updates(ref_params, updates)
    ours, opt, loss = step(ours, opt, batch["inputs"], batch["targets"])
    np.testing.assert_allclose(loss, value, rtol=1e-6)
    losses.append(float(loss))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert losses[2] < losses[0]  # it trains
