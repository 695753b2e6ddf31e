"""A decoder-only transformer in Flax linen: RoPE, RMSNorm, SwiGLU and grouped-query attention.

The model knows shapes and logical axis names only; `lm.partitioning` maps those names onto a
mesh. Parameter axes: `vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`.
Activation axes carry an `act_` prefix so that batch and parameter shardings never collide.
Shapes are in the names: B batch, T length, D d_model, H heads, G query heads per kv head,
K kv heads, E head_dim, F d_ff, V vocab.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  d_ff: int = 384
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  scan_layers: bool = False
  remat: str = "none"

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, vocab_size: int) -> "ModelConfig":
    m = cfg.model
    return cls(
      vocab_size=vocab_size,
      d_model=m.d_model,
      n_layers=m.n_layers,
      n_heads=m.n_heads,
      n_kv_heads=m.n_kv_heads,
      d_ff=m.d_ff,
      tie_embeddings=m.tie_embeddings,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      rope_base=m.rope_base,
      norm_eps=m.norm_eps,
      scan_layers=m.scan_layers,
      remat=m.remat,
    )


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init, cfg: ModelConfig) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))


def _dot(eq: str, x: Array, w: Array, dtype: str) -> Array:
  """einsum with inputs cast to the compute dtype and f32 accumulation and output."""
  return jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _project(x: Array, w: Array, n_in: int, dtype: str) -> Array:
  """Contracts the last `n_in` axes of `x` with the first `n_in` of `w` as one 2-D matmul.

  Flattening to [rows, in] @ [in, out] keeps both the forward and the weight-gradient matmul
  plain GEMMs; XLA:CPU runs 3-D einsums of the same shapes about 20% slower.
  """
  lead, out = x.shape[: x.ndim - n_in], w.shape[n_in:]
  x_NxI = x.reshape(-1, math.prod(w.shape[:n_in])).astype(dtype)
  w_IxO = w.reshape(x_NxI.shape[1], -1).astype(dtype)
  return jnp.matmul(x_NxI, w_IxO, preferred_element_type=jnp.float32).reshape(*lead, *out)


def _fan_in_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in**-0.5)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    scale_D = _param(self, "scale", (self.cfg.d_model,), ("embed",), nn.initializers.ones, self.cfg)
    ms_BxTx1 = jnp.mean(jnp.square(x_BxTxD), axis=-1, keepdims=True)
    return x_BxTxD * jax.lax.rsqrt(ms_BxTx1 + self.cfg.norm_eps) * scale_D.astype(jnp.float32)


def rope_tables(positions_BxT: Array, head_dim: int, base: float) -> tuple[Array, Array]:
  """cos and sin [B, T, 1, E/2] of the angles position * base^(-2i/E), shared by all layers."""
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1xE = (positions_BxT[..., None].astype(jnp.float32) * inv_freq)[:, :, None, :]
  return jnp.cos(angle_BxTx1xE), jnp.sin(angle_BxTx1xE)


def rope(x_BxTxNxE: Array, rope_BxTx1xE: tuple[Array, Array]) -> Array:
  """Rotates the two halves of each head by the angles of `rope_tables`."""
  cos, sin = rope_BxTx1xE
  half = x_BxTxNxE.shape[-1] // 2
  x1, x2 = x_BxTxNxE[..., :half], x_BxTxNxE[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention_mask(segment_ids_BxT: Array) -> Array:
  """True where query t may attend to key s: s <= t and both in the same non-padding segment."""
  t = segment_ids_BxT.shape[1]
  causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return causal_TxS[None] & same_BxTxS


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, rope_BxTx1xE: tuple[Array, Array], mask_BxTxS: Array) -> Array:
    c = self.cfg
    h, k, e, d = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    g = h // k
    init = _fan_in_init(d)
    wq_DxHxE = _param(self, "wq", (d, h, e), ("embed", "heads", "head_dim"), init, c)
    wk_DxKxE = _param(self, "wk", (d, k, e), ("embed", "kv_heads", "head_dim"), init, c)
    wv_DxKxE = _param(self, "wv", (d, k, e), ("embed", "kv_heads", "head_dim"), init, c)
    wo_HxExD = _param(self, "wo", (h, e, d), ("heads", "head_dim", "embed"), _fan_in_init(h * e), c)

    q_BxTxHxE = rope(_project(x_BxTxD, wq_DxHxE, 1, c.dtype), rope_BxTx1xE)
    k_BxSxKxE = rope(_project(x_BxTxD, wk_DxKxE, 1, c.dtype), rope_BxTx1xE)
    v_BxSxKxE = _project(x_BxTxD, wv_DxKxE, 1, c.dtype)
    q_BxTxHxE = nn.with_logical_constraint(q_BxTxHxE, ("act_batch", "act_length", "act_heads", None))

    # Heads-major layouts make both attention matmuls plain batched matmuls over (B, K), with
    # the G query heads that share a kv head stacked along the rows: N = G * T.
    b, t = x_BxTxD.shape[:2]
    q_BxKxNxE = (q_BxTxHxE * e**-0.5).reshape(b, t, k, g, e).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, e)
    k_BxKxExS = k_BxSxKxE.transpose(0, 2, 3, 1).astype(c.dtype)
    v_BxKxSxE = v_BxSxKxE.transpose(0, 2, 1, 3).astype(c.dtype)
    logits_BxKxNxS = jnp.matmul(q_BxKxNxE.astype(c.dtype), k_BxKxExS, preferred_element_type=jnp.float32)
    logits_BxKxGxTxS = logits_BxKxNxS.reshape(b, k, g, t, t)
    logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, -1e30)
    probs_BxKxNxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).reshape(b, k, g * t, t).astype(c.dtype)
    out_BxKxNxE = jnp.matmul(probs_BxKxNxS, v_BxKxSxE, preferred_element_type=jnp.float32)
    out_BxTxHxE = out_BxKxNxE.reshape(b, k, g, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)
    return _project(out_BxTxHxE, wo_HxExD, 2, c.dtype)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    c = self.cfg
    w_gate_DxF = _param(self, "w_gate", (c.d_model, c.d_ff), ("embed", "mlp"), _fan_in_init(c.d_model), c)
    w_up_DxF = _param(self, "w_up", (c.d_model, c.d_ff), ("embed", "mlp"), _fan_in_init(c.d_model), c)
    w_down_FxD = _param(self, "w_down", (c.d_ff, c.d_model), ("mlp", "embed"), _fan_in_init(c.d_ff), c)
    gate_BxTxF = _project(x_BxTxD, w_gate_DxF, 1, c.dtype)
    up_BxTxF = _project(x_BxTxD, w_up_DxF, 1, c.dtype)
    h_BxTxF = nn.with_logical_constraint(jax.nn.silu(gate_BxTxF) * up_BxTxF, ("act_batch", "act_length", "act_mlp"))
    return _project(h_BxTxF, w_down_FxD, 1, c.dtype)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, rope_BxTx1xE: tuple[Array, Array], mask_BxTxS: Array) -> Array:
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_length", "act_embed"))
    x_BxTxD = x_BxTxD + Attention(self.cfg, name="attn")(
      RMSNorm(self.cfg, name="attn_norm")(x_BxTxD), rope_BxTx1xE, mask_BxTxS
    )
    x_BxTxD = x_BxTxD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BxTxD))
    return x_BxTxD


class ScanBlock(Block):
  """A Block with the (carry, xs) -> (carry, ys) signature nn.scan expects."""

  def __call__(self, x_BxTxD, rope_BxTx1xE, mask_BxTxS):
    return super().__call__(x_BxTxD, rope_BxTx1xE, mask_BxTxS), None


REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """Token ids [B, T] (with segment ids and positions for packed rows) -> f32 logits [B, T, V]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: Array, segment_ids_BxT: Array | None = None, positions_BxT: Array | None = None):
    c = self.cfg
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(tokens_BxT)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    embed_VxD = _param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"), nn.initializers.normal(1.0), c)
    # Gather from a copy replicated along `embed`, so the lookup needs no resharding.
    table_VxD = nn.with_logical_constraint(embed_VxD, ("vocab", None))
    x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(jnp.float32)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_length", "act_embed"))
    mask_BxTxS = attention_mask(segment_ids_BxT)
    rope_BxTx1xE = rope_tables(positions_BxT, c.head_dim, c.rope_base)

    block = ScanBlock if c.scan_layers else Block
    if c.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=c.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, name="layers")
      x_BxTxD, _ = stack(x_BxTxD, rope_BxTx1xE, mask_BxTxS)
    else:
      for i in range(c.n_layers):
        x_BxTxD = block(c, name=f"layer_{i}")(x_BxTxD, rope_BxTx1xE, mask_BxTxS)

    x_BxTxD = RMSNorm(c, name="final_norm")(x_BxTxD)
    if c.tie_embeddings:
      logits_BxTxV = _dot("btd,vd->btv", x_BxTxD, embed_VxD, c.dtype)
    else:
      head_DxV = _param(self, "head", (c.d_model, c.vocab_size), ("embed", "vocab"), _fan_in_init(c.d_model), c)
      logits_BxTxV = _project(x_BxTxD, head_DxV, 1, c.dtype)
    return nn.with_logical_constraint(logits_BxTxV, ("act_batch", "act_length", "act_vocab"))


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array, z_loss: float = 0.0) -> tuple[Array, Array]:
  """Per-token (cross-entropy + z_loss * logZ^2, logZ) in f32."""
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  loss_BxT = log_z_BxT - target_logit_BxT
  if z_loss:
    loss_BxT = loss_BxT + z_loss * jnp.square(log_z_BxT)
  return loss_BxT, log_z_BxT


@functools.partial(jax.jit, static_argnames=("model",))
def forward(model: Transformer, params, batch: dict) -> Array:
  """Logits for a batch dict; a convenience for tests and tools, not the train step."""
  return model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
