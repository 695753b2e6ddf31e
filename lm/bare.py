"""The model and train step written in bare jax.numpy: the baseline `lm bench train` measures against.

No Flax, optax, sharding or custom VJPs: the decoder of `lm.model` (RoPE, RMSNorm, SwiGLU,
grouped-query attention, untied head) as one function of a dict of arrays, attention by
`jax.nn.dot_product_attention`, and AdamW with global-norm clipping written out, as someone who
writes JAX by hand would. Like the PyTorch peer, it decays every parameter and keeps the learning
rate constant. It reads `lm.model`'s parameter tree (unscanned layers, no tied embeddings), so the
two can be checked against each other.
"""

import functools

import jax
import jax.numpy as jnp


def rms_norm(x_BxTxD, scale_D, eps: float):
  return x_BxTxD * jax.lax.rsqrt(jnp.mean(x_BxTxD * x_BxTxD, axis=-1, keepdims=True) + eps) * scale_D


def rope(x_BxTxNxE, base: float):
  """Rotates each head's halves (x1, x2) to (x1 cos - x2 sin, x1 sin + x2 cos) by position."""
  t, e = x_BxTxNxE.shape[1], x_BxTxNxE.shape[-1]
  angle_TxH = jnp.arange(t, dtype=jnp.float32)[:, None] * base ** (-jnp.arange(e // 2, dtype=jnp.float32) / (e // 2))
  cos_Tx1xH, sin_Tx1xH = jnp.cos(angle_TxH)[:, None], jnp.sin(angle_TxH)[:, None]
  x1, x2 = x_BxTxNxE[..., : e // 2], x_BxTxNxE[..., e // 2 :]
  return jnp.concatenate([x1 * cos_Tx1xH - x2 * sin_Tx1xH, x1 * sin_Tx1xH + x2 * cos_Tx1xH], axis=-1)


def loss(params: dict, inputs_BxT, targets_BxT, n_layers: int, eps: float = 1e-6, rope_base: float = 10_000.0):
  """Mean next-token cross-entropy of one batch of unpacked rows."""
  x = params["embed"][inputs_BxT]
  for i in range(n_layers):
    p = params[f"layer_{i}"]
    h = rms_norm(x, p["attn_norm"]["scale"], eps)
    q = rope(jnp.einsum("btd,dhe->bthe", h, p["attn"]["wq"]), rope_base)
    k = rope(jnp.einsum("btd,dke->btke", h, p["attn"]["wk"]), rope_base)
    v = jnp.einsum("btd,dke->btke", h, p["attn"]["wv"])
    x = x + jnp.einsum("bthe,hed->btd", jax.nn.dot_product_attention(q, k, v, is_causal=True), p["attn"]["wo"])
    h = rms_norm(x, p["mlp_norm"]["scale"], eps)
    x = x + (jax.nn.silu(h @ p["mlp"]["w_gate"]) * (h @ p["mlp"]["w_up"])) @ p["mlp"]["w_down"]
  logits_BxTxV = rms_norm(x, params["final_norm"]["scale"], eps) @ params["head"]
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_BxT)


def init_opt(params: dict) -> dict:
  """AdamW's moments (zeros like `params`) and step count."""
  zeros = functools.partial(jax.tree.map, jnp.zeros_like)
  return {"mu": zeros(params), "nu": zeros(params), "count": jnp.zeros((), jnp.int32)}


def make_step(
  n_layers: int,
  lr: float = 3e-4,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.1,
  clip_norm: float = 1.0,
  norm_eps: float = 1e-6,
  rope_base: float = 10_000.0,
):
  """A jitted `(params, opt, inputs, targets) -> (params, opt, loss)`: AdamW after global-norm clipping."""
  loss_fn = functools.partial(loss, n_layers=n_layers, eps=norm_eps, rope_base=rope_base)

  def step(params, opt, inputs_BxT, targets_BxT):
    value, grads = jax.value_and_grad(loss_fn)(params, inputs_BxT, targets_BxT)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip_norm / (norm + 1e-6)), grads)
    count = opt["count"] + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, opt["mu"], grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, opt["nu"], grads)
    c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
    params = jax.tree.map(
      lambda p, m, v: p - lr * (m / c1 / (jnp.sqrt(v / c2) + eps) + weight_decay * p), params, mu, nu
    )
    return params, {"mu": mu, "nu": nu, "count": count}, value

  return jax.jit(step, donate_argnums=(0, 1))
