"""A decoder-only transformer in Flax linen: RoPE, RMSNorm, SwiGLU and grouped-query attention.

The model knows shapes and logical axis names only; `lm.partitioning` maps those names onto a
mesh. Parameter axes: `vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`.
Activation axes carry an `act_` prefix so that batch and parameter shardings never collide.
Parameters are stored in f32 whatever `param_dtype`, which is the dtype they are used in: with
bfloat16 the forward pass reads bf16-rounded weights while updates accumulate in the f32 copy.
Shapes are in the names: B batch, T length, D d_model, H heads, G query heads per kv head,
K kv heads, E head_dim, F d_ff, V vocab, R LoRA rank.

Two heads read the final hidden states: `head="lm"`, next-token logits [B, T, V], and `head="scalar"`,
one score per position [B, T] (`last_token` reads a reward model's at each row's last real token).
Their trunks have the same parameter names, so a reward model starts from a language model's run
(`trunk_params`). LoRA adapters (`lora_rank` > 0) add (alpha / R) * x A B to the projections named in
`lora_targets`; `lm.lora` trains, masks and merges them.

Mixture of experts (`moe.experts` > 0): the MLP of every `moe.every`-th layer becomes `MoE`, routed SwiGLU
experts (parameter axes `expert`, `embed`, `expert_mlp`). Tokens are routed in groups: X experts, S tokens
a group, C slots an expert per group, M = K * S a group's (token, choice) pairs.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from lm import kernels
from lm.config import LORA_TARGETS  # by parameter name: attention q, k, v, o and the SwiGLU MLP's three

Array = jax.Array


HEADS = ("lm", "scalar")
LORA_A, LORA_B = "_lora_a", "_lora_b"  # an adapter's parameters are its target's name with these suffixes


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """`model.moe.*` (see `lm.config`) as the model reads it; `experts=0` is a dense model."""

  experts: int = 0
  top_k: int = 2
  every: int = 1
  shared_experts: int = 0
  d_ff: int = 0
  capacity_factor: float = 1.25
  group_size: int = 0
  renormalize: bool = True
  router_dtype: str = "float32"

  def expert_d_ff(self, d_ff: int) -> int:
    return self.d_ff or d_ff

  def is_moe_layer(self, layer: int) -> bool:
    return self.experts > 0 and (layer + 1) % self.every == 0

  def group_tokens(self, length: int) -> int:
    """Tokens per routing group for rows of `length`: `group_size` where it divides them, else one row."""
    return self.group_size if self.group_size and length % self.group_size == 0 else length

  def capacity(self, group_tokens: int) -> int:
    """Slots per expert and group: ceil(capacity_factor * S * K / X), at most S; dropless (factor 0) is S."""
    if not self.capacity_factor:
      return group_tokens
    return min(group_tokens, math.ceil(self.capacity_factor * group_tokens * self.top_k / self.experts))


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
  param_dtype: str = "float32"  # the dtype weights are used in; they are stored and updated in f32
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  scan_layers: bool = False
  remat: str = "none"
  head: str = "lm"  # lm: logits [B, T, V] | scalar: a score per position [B, T], the head zero at init
  lora_rank: int = 0  # R > 0 adds LoRA adapters to the projections in lora_targets
  lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
  lora_targets: tuple[str, ...] = LORA_TARGETS
  moe: MoEConfig = MoEConfig()
  attention: str = "xla"  # the training forward's attention: xla, or a fused kernel of lm.kernels.FUSED
  kernel_interpret: bool = False  # run Pallas kernels in interpret mode (tests on CPU)

  def __post_init__(self):
    assert self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}"
    assert set(self.lora_targets) <= set(LORA_TARGETS), f"lora_targets must be among {LORA_TARGETS}"

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
      lora_rank=m.lora_rank,
      lora_alpha=m.lora_alpha,
      lora_targets=tuple(m.lora_targets),
      moe=MoEConfig(**{f.name: m.moe[f.name] for f in dataclasses.fields(MoEConfig)}),
      # `auto` runs the xla path until `lm.state.build` resolves it for the mesh's devices.
      attention=m.attention if m.attention in kernels.FUSED else "xla",
    )


def _param(module: nn.Module, name: str, shape: tuple, axes: tuple, init, cfg: ModelConfig) -> Array:
  """A parameter stored in f32 (the master weights that updates and optimizer moments accumulate in), used
  rounded to `cfg.param_dtype`; its gradient comes back in f32 through the cast."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32).astype(cfg.param_dtype)


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


def _adapted(module: nn.Module, name: str, x: Array, w: Array, n_in: int, axes: tuple, cfg: ModelConfig) -> Array:
  """x @ w over w's first `n_in` axes, plus (lora_alpha / R) * (x @ A) @ B if `name` is in cfg.lora_targets.

  A [in..., R] starts random and B [R, out...] at zero, so a fresh adapter adds exactly 0. Both take
  w's logical axes `axes` (the rank axis is unnamed, so replicated) and shard by the same rules.
  """
  y = _project(x, w, n_in, cfg.dtype)
  if not cfg.lora_rank or name not in cfg.lora_targets:
    return y
  r, w_in, w_out = cfg.lora_rank, w.shape[:n_in], w.shape[n_in:]
  a_init = _fan_in_init(math.prod(w_in))
  a = _param(module, name + LORA_A, (*w_in, r), (*axes[:n_in], None), a_init, cfg)
  b = _param(module, name + LORA_B, (r, *w_out), (None, *axes[n_in:]), nn.initializers.zeros, cfg)
  return y + (cfg.lora_alpha / r) * _project(_project(x, a, n_in, cfg.dtype), b, 1, cfg.dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    scale_D = _param(self, "scale", (self.cfg.d_model,), ("embed",), nn.initializers.ones, self.cfg)
    ms_BxTx1 = jnp.mean(jnp.square(x_BxTxD), axis=-1, keepdims=True)
    return x_BxTxD * jax.lax.rsqrt(ms_BxTx1 + self.cfg.norm_eps) * scale_D.astype(jnp.float32)


def rope_tables(positions_BxT: Array, head_dim: int, base: float) -> tuple[Array, Array]:
  """cos and signed sin [B, T, 1, 2, E/2] of the angles position * base^(-2i/E), shared by all layers."""
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1x1xE = (positions_BxT[..., None].astype(jnp.float32) * inv_freq)[:, :, None, None, :]
  cos_BxTx1x1xE, sin_BxTx1x1xE = jnp.cos(angle_BxTx1x1xE), jnp.sin(angle_BxTx1x1xE)
  return jnp.concatenate([cos_BxTx1x1xE] * 2, axis=3), jnp.concatenate([-sin_BxTx1x1xE, sin_BxTx1x1xE], axis=3)


def rope(x_BxTxNxE: Array, rope_BxTx1x2xE: tuple[Array, Array]) -> Array:
  """Rotates the two halves (x1, x2) of each head to (x1 cos - x2 sin, x1 sin + x2 cos)."""
  cos, signed_sin = rope_BxTx1x2xE
  x_BxTxNx2xE = x_BxTxNxE.reshape(*x_BxTxNxE.shape[:-1], 2, -1)
  # Swapping the halves with a reverse, not a concatenate, keeps this one fusible elementwise loop.
  out_BxTxNx2xE = x_BxTxNx2xE * cos + jnp.flip(x_BxTxNx2xE, axis=3) * signed_sin
  return out_BxTxNx2xE.reshape(x_BxTxNxE.shape)


def attention_mask(segment_ids_BxT: Array) -> Array:
  """True where query t may attend to key s: s <= t and both in the same non-padding segment."""
  t = segment_ids_BxT.shape[1]
  causal_TxS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return causal_TxS[None] & same_BxTxS


def _bmm(a: Array, b: Array, dtype: str) -> Array:
  """a @ b batched over the leading axes, inputs in the compute dtype, f32 out."""
  return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


QUERY_BLOCK = 128


def query_blocks(t: int, block: int = QUERY_BLOCK) -> list[tuple[int, int]]:
  """Causal query blocks [lo, hi): the queries of a block attend to keys [0, hi) only.

  Skipping the keys after each block saves about half of the attention's FLOPs and score memory
  for long rows (a quarter at 256 tokens). A length that is not a multiple of `block` is one block.
  """
  if t <= block or t % block:
    return [(0, t)]
  return [(lo, lo + block) for lo in range(0, t, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q_BxKxNxE: Array, k_BxKxSxE: Array, v_BxKxSxE: Array, mask_BxTxS: Array, dtype: str) -> Array:
  """softmax(q k^T masked) v for the N = G * T query rows of each kv head; q comes pre-scaled.

  The mask must be causal (the training path's): each query block reads only the keys up to its end.
  """
  return _attend_fwd(q_BxKxNxE, k_BxKxSxE, v_BxKxSxE, mask_BxTxS, dtype)[0]


def _attend_fwd(q_BxKxNxE, k_BxKxSxE, v_BxKxSxE, mask_BxTxS, dtype):
  b, k, n, e = q_BxKxNxE.shape
  t, s = mask_BxTxS.shape[1:]
  g = n // t
  q_QxGxTxE = q_BxKxNxE.reshape(b * k, g, t, e)
  k_QxExS = k_BxKxSxE.swapaxes(-1, -2).reshape(b * k, e, s)
  v_QxSxE = v_BxKxSxE.reshape(b * k, s, e)
  outs, weights, sums = [], [], []
  for lo, hi in query_blocks(t):
    q_QxMxE = q_QxGxTxE[:, :, lo:hi].reshape(b * k, g * (hi - lo), e)
    out_QxMxE, w_QxMxH, sum_QxMx1 = _attend_core(
      q_QxMxE, k_QxExS[:, :, :hi], v_QxSxE[:, :hi], mask_BxTxS[:, lo:hi, :hi], dtype
    )
    outs.append(out_QxMxE.reshape(b * k, g, hi - lo, e))
    weights.append(w_QxMxH)
    sums.append(sum_QxMx1)
  out_BxKxNxE = jnp.concatenate(outs, axis=2).reshape(b, k, n, e)
  return out_BxKxNxE, (q_BxKxNxE, k_BxKxSxE, v_BxKxSxE, tuple(weights), tuple(sums), out_BxKxNxE)


def _attend_core(q_QxNxE, k_QxExS, v_QxSxE, mask_BxTxS, dtype):
  """(output, unnormalised weights, their row sums) over Q = B * K (batch row, kv head) pairs.

  Keys come transposed and the pairs flattened, so that both matmuls read their operands as they
  are stored: a decode step reads the cache in place instead of copying it.
  """
  q, n, _ = q_QxNxE.shape
  b, t, s = mask_BxTxS.shape
  logits_BxKxGxTxS = _bmm(q_QxNxE, k_QxExS, dtype).reshape(b, q // b, n // t, t, s)
  logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, -1e30)
  max_BxKxGxTx1 = jnp.max(logits_BxKxGxTxS, axis=-1, keepdims=True)
  # Unnormalised weights: dividing the [N, E] output by the row sum is cheaper than the [N, S] weights.
  w_QxNxS = jnp.exp(logits_BxKxGxTxS - max_BxKxGxTx1).reshape(q, n, s)
  sum_QxNx1 = jnp.sum(w_QxNxS, axis=-1, keepdims=True)
  out_QxNxE = _bmm(w_QxNxS, v_QxSxE, dtype) / sum_QxNx1
  return out_QxNxE, w_QxNxS, sum_QxNx1


def _attend_bwd(dtype, res, d_out_BxKxNxE):
  q_BxKxNxE, k_BxKxSxE, v_BxKxSxE, weights, sums, out_BxKxNxE = res
  b, k, n, e = q_BxKxNxE.shape
  s = k_BxKxSxE.shape[2]
  g, q = n // s, b * k  # training rows attend to their own row: T == S
  q_QxGxTxE, d_out_QxGxTxE, out_QxGxTxE = (x.reshape(q, g, s, e) for x in (q_BxKxNxE, d_out_BxKxNxE, out_BxKxNxE))
  k_QxSxE, v_QxSxE = k_BxKxSxE.reshape(q, s, e), v_BxKxSxE.reshape(q, s, e)
  d_qs, d_k_QxSxE, d_v_QxSxE = [], jnp.zeros((q, s, e), jnp.float32), jnp.zeros((q, s, e), jnp.float32)
  for (lo, hi), w_QxMxH, sum_QxMx1 in zip(query_blocks(s), weights, sums, strict=True):
    q_QxMxE, d_out_QxMxE, out_QxMxE = (
      x[:, :, lo:hi].reshape(q, -1, e) for x in (q_QxGxTxE, d_out_QxGxTxE, out_QxGxTxE)
    )
    d_out_QxMxE = d_out_QxMxE / sum_QxMx1
    d_w_QxMxH = _bmm(d_out_QxMxE, v_QxSxE[:, :hi].swapaxes(-1, -2), dtype)
    # The softmax backward's row sum of probs * d_probs equals the row sum of d_out * out: E wide, not S.
    delta_QxMx1 = jnp.sum(d_out_QxMxE * out_QxMxE, axis=-1, keepdims=True)
    d_logits_QxMxH = w_QxMxH * (d_w_QxMxH - delta_QxMx1)
    d_qs.append(_bmm(d_logits_QxMxH, k_QxSxE[:, :hi], dtype).reshape(q, g, hi - lo, e))
    tail = ((0, 0), (0, s - hi), (0, 0))
    d_k_QxSxE += jnp.pad(_bmm(d_logits_QxMxH.swapaxes(-1, -2), q_QxMxE, dtype), tail)
    d_v_QxSxE += jnp.pad(_bmm(w_QxMxH.swapaxes(-1, -2), d_out_QxMxE, dtype), tail)
  d_q_BxKxNxE = jnp.concatenate(d_qs, axis=2).reshape(q_BxKxNxE.shape)
  return (
    d_q_BxKxNxE.astype(q_BxKxNxE.dtype),
    d_k_QxSxE.reshape(k_BxKxSxE.shape).astype(k_BxKxSxE.dtype),
    d_v_QxSxE.reshape(v_BxKxSxE.shape).astype(v_BxKxSxE.dtype),
    None,
  )


_attend.defvjp(_attend_fwd, _attend_bwd)


@jax.custom_vjp
def _swiglu(gate_BxTxF: Array, up_BxTxF: Array) -> Array:
  """silu(gate) * up; the VJP keeps only gate and up and recomputes the sigmoid."""
  return jax.nn.silu(gate_BxTxF) * up_BxTxF


def _swiglu_fwd(gate_BxTxF, up_BxTxF):
  return _swiglu(gate_BxTxF, up_BxTxF), (gate_BxTxF, up_BxTxF)


def _swiglu_bwd(res, d_h_BxTxF):
  # The barrier stops XLA from merging this sigmoid with the forward one and saving it.
  gate_BxTxF, up_BxTxF = jax.lax.optimization_barrier(res)
  sig_BxTxF = jax.nn.sigmoid(gate_BxTxF)
  d_up_BxTxF = d_h_BxTxF * gate_BxTxF * sig_BxTxF
  d_gate_BxTxF = d_h_BxTxF * up_BxTxF * sig_BxTxF * (1.0 + gate_BxTxF * (1.0 - sig_BxTxF))
  return d_gate_BxTxF, d_up_BxTxF


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array, rope_BxTx1x2xE: tuple[Array, Array], mask_BxTxS: Array, cache=None, index=None):
    """Returns (output, cache). With a cache (keys [B * K, E, S], values [B * K, S, E]), this call's
    keys and values are written at slots `index` to `index + T` and the queries attend over the cache.
    With a fused kernel (`cfg.attention`) and no cache, `mask_BxTxS` is the [B, T] segment ids."""
    c = self.cfg
    h, k, e, d = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    g = h // k
    init = _fan_in_init(d)
    q_axes, kv_axes, o_axes = (
      ("embed", "heads", "head_dim"),
      ("embed", "kv_heads", "head_dim"),
      ("heads", "head_dim", "embed"),
    )
    wq_DxHxE = _param(self, "wq", (d, h, e), q_axes, init, c)
    wk_DxKxE = _param(self, "wk", (d, k, e), kv_axes, init, c)
    wv_DxKxE = _param(self, "wv", (d, k, e), kv_axes, init, c)
    wo_HxExD = _param(self, "wo", (h, e, d), o_axes, _fan_in_init(h * e), c)

    q_BxTxHxE = rope(_adapted(self, "wq", x_BxTxD, wq_DxHxE, 1, q_axes, c), rope_BxTx1x2xE)
    k_BxTxKxE = rope(_adapted(self, "wk", x_BxTxD, wk_DxKxE, 1, kv_axes, c), rope_BxTx1x2xE)
    v_BxTxKxE = _adapted(self, "wv", x_BxTxD, wv_DxKxE, 1, kv_axes, c)
    q_BxTxHxE = nn.with_logical_constraint(q_BxTxHxE, ("act_batch", "act_length", "act_heads", None))

    if cache is None and c.attention in kernels.FUSED:
      qkv = (x.astype(c.dtype) for x in (q_BxTxHxE * e**-0.5, k_BxTxKxE, v_BxTxKxE))
      out_BxTxHxE = kernels.attention(c.attention, *qkv, mask_BxTxS, interpret=c.kernel_interpret)
      return _adapted(self, "wo", out_BxTxHxE, wo_HxExD, 2, o_axes, c), cache

    # Heads-major layouts make both attention matmuls plain batched matmuls over (B, K), with
    # the G query heads that share a kv head stacked along the rows: N = G * T.
    b, t = x_BxTxD.shape[:2]
    q_BxKxNxE = (q_BxTxHxE * e**-0.5).reshape(b, t, k, g, e).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, e)
    if cache is None:
      k_BxKxSxE = k_BxTxKxE.transpose(0, 2, 1, 3).astype(c.dtype)
      v_BxKxSxE = v_BxTxKxE.transpose(0, 2, 1, 3).astype(c.dtype)
      out_BxKxNxE = _attend(q_BxKxNxE.astype(c.dtype), k_BxKxSxE, v_BxKxSxE, mask_BxTxS, c.dtype)
    else:
      # Stored in the layouts the attention matmuls read, and updated in place: a step copies no cache.
      new_k_QxExT = k_BxTxKxE.transpose(0, 2, 3, 1).reshape(b * k, e, t).astype(cache[0].dtype)
      new_v_QxTxE = v_BxTxKxE.transpose(0, 2, 1, 3).reshape(b * k, t, e).astype(cache[1].dtype)
      cache = k_QxExS, v_QxSxE = (
        jax.lax.dynamic_update_slice(cache[0], new_k_QxExT, (0, 0, index)),
        jax.lax.dynamic_update_slice(cache[1], new_v_QxTxE, (0, index, 0)),
      )
      q_QxNxE = q_BxKxNxE.reshape(b * k, g * t, e).astype(c.dtype)
      out_BxKxNxE = _attend_core(q_QxNxE, k_QxExS, v_QxSxE, mask_BxTxS, c.dtype)[0].reshape(b, k, g * t, e)
    out_BxTxHxE = out_BxKxNxE.reshape(b, k, g, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)
    return _adapted(self, "wo", out_BxTxHxE, wo_HxExD, 2, o_axes, c), cache


class MLP(nn.Module):
  cfg: ModelConfig
  d_ff: int = 0  # 0: cfg.d_ff (an MoE layer's shared experts are one MLP of their summed width)

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    c = self.cfg
    f = self.d_ff or c.d_ff
    w_gate_DxF = _param(self, "w_gate", (c.d_model, f), ("embed", "mlp"), _fan_in_init(c.d_model), c)
    w_up_DxF = _param(self, "w_up", (c.d_model, f), ("embed", "mlp"), _fan_in_init(c.d_model), c)
    w_down_FxD = _param(self, "w_down", (f, c.d_model), ("mlp", "embed"), _fan_in_init(f), c)
    gate_BxTxF = _adapted(self, "w_gate", x_BxTxD, w_gate_DxF, 1, ("embed", "mlp"), c)
    up_BxTxF = _adapted(self, "w_up", x_BxTxD, w_up_DxF, 1, ("embed", "mlp"), c)
    h_BxTxF = nn.with_logical_constraint(_swiglu(gate_BxTxF, up_BxTxF), ("act_batch", "act_length", "act_mlp"))
    return _adapted(self, "w_down", h_BxTxF, w_down_FxD, 1, ("mlp", "embed"), c)


def route(logits_GxSxX: Array, top_k: int, capacity: int, renormalize: bool) -> tuple[Array, Array, dict]:
  """Softmax-then-top-k routing of each group's tokens to C = `capacity` slots per expert.

  Returns (dispatch [G, S, X, C], 1 where token s fills slot c of expert x; combine [G, S, X, C], the
  token's routing weight there; statistics). Weights are the top-k softmax probabilities, renormalised to
  sum to 1 over the chosen experts if `renormalize` (Mixtral's convention). Slots fill by choice rank,
  then token order: every token's first choice before any second choice (GShard), so that overflow drops
  second choices first. A (token, choice) beyond its expert's capacity is dropped: that expert adds nothing
  for the token (the residual carries it). Statistics, f32 scalars unless said: `load` [X], the fraction of
  (token, choice) pairs routed to each expert before dropping; `dropped`, the fraction dropped;
  `entropy`, the router's mean entropy; `aux_loss`, Switch's X * sum_x load_x * mean prob_x (1 when
  balanced); `z_loss`, the mean squared logsumexp of the logits (ST-MoE).
  """
  g, s, x = logits_GxSxX.shape
  logits_GxSxX = logits_GxSxX.astype(jnp.float32)
  probs_GxSxX = jax.nn.softmax(logits_GxSxX, axis=-1)
  _, experts_GxSxK = jax.lax.top_k(jax.lax.stop_gradient(probs_GxSxX), top_k)
  # The chosen probabilities by a one-hot product, not top_k's values: their gradient would be a scatter-add,
  # which XLA offloads to v5p's SparseCores and its cost model then prices at about -2 s.
  weights_GxSxK = jnp.sum(jax.nn.one_hot(experts_GxSxK, x, dtype=jnp.float32) * probs_GxSxX[:, :, None, :], axis=-1)
  if renormalize:
    weights_GxSxK = weights_GxSxK / jnp.sum(weights_GxSxK, axis=-1, keepdims=True)
  chosen_GxMxX = jax.nn.one_hot(experts_GxSxK.swapaxes(1, 2).reshape(g, top_k * s), x, dtype=jnp.int32)
  slot_GxM = jnp.sum((jnp.cumsum(chosen_GxMxX, axis=1) - 1) * chosen_GxMxX, axis=-1)
  kept_GxM = slot_GxM < capacity
  slot_GxMxC = jax.nn.one_hot(jnp.where(kept_GxM, slot_GxM, capacity), capacity, dtype=jnp.float32)
  dispatch_GxMxXxC = chosen_GxMxX.astype(jnp.float32)[..., None] * slot_GxMxC[:, :, None, :]
  dispatch_GxKxSxXxC = dispatch_GxMxXxC.reshape(g, top_k, s, x, capacity)
  weights_GxKxSx1x1 = weights_GxSxK.swapaxes(1, 2)[..., None, None]
  dispatch_GxSxXxC = jnp.sum(dispatch_GxKxSxXxC, axis=1)  # a token's choices are distinct experts: 0 or 1
  combine_GxSxXxC = jnp.sum(dispatch_GxKxSxXxC * weights_GxKxSx1x1, axis=1)
  load_X = jnp.mean(chosen_GxMxX, axis=(0, 1), dtype=jnp.float32)
  stats = {
    "load": load_X,
    "dropped": 1.0 - jnp.mean(kept_GxM.astype(jnp.float32)),
    "entropy": jnp.mean(-jnp.sum(probs_GxSxX * jax.nn.log_softmax(logits_GxSxX, axis=-1), axis=-1)),
    "aux_loss": x * jnp.sum(load_X * jnp.mean(probs_GxSxX, axis=(0, 1))),
    "z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits_GxSxX, axis=-1))),
  }
  return dispatch_GxSxXxC, combine_GxSxXxC, stats


MOE_STATS = ("load", "dropped", "entropy", "aux_loss", "z_loss")


class MoE(nn.Module):
  """Routed SwiGLU experts (and optional shared ones) in place of a layer's MLP.

  Dispatch and combine are dense einsums with one-hot [G, S, X, C] tensors (GShard's formulation): the
  tokens move to [X, G, C, D] expert buffers, whose expert axis the `expert` mesh axis splits, so under
  expert parallelism the partitioner turns the two einsums into all-to-alls. Their memory is G * S * X * C
  per tensor, about K * capacity_factor * S per token, so long rows want a `group_size`. The statistics
  of `route` are sown into the `moe` collection (the train loss adds the auxiliary losses).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    c, m = self.cfg, self.cfg.moe
    b, t, d = x_BxTxD.shape
    x, f = m.experts, m.expert_d_ff(c.d_ff)
    s = m.group_tokens(t)
    router_init = nn.with_logical_partitioning(_fan_in_init(d), ("embed", None))
    router_DxX = self.param("router", router_init, (d, x), jnp.float32)
    x_GxSxD = x_BxTxD.reshape(b * t // s, s, d)
    logits_GxSxX = _dot("gsd,dx->gsx", x_GxSxD, router_DxX, m.router_dtype)
    dispatch_GxSxXxC, combine_GxSxXxC, stats = route(logits_GxSxX, m.top_k, m.capacity(s), m.renormalize)
    for name, value in stats.items():
      self.sow("moe", name, value)

    expert_axes = ("act_expert", "act_expert_groups", None, "act_embed")
    # Each slot holds one token or zeros, so this copy is exact whatever the dtype.
    in_XxGxCxD = _dot("gsxc,gsd->xgcd", dispatch_GxSxXxC, x_GxSxD, c.dtype)
    in_XxGxCxD = nn.with_logical_constraint(in_XxGxCxD, expert_axes)
    init = _fan_in_init(d)
    w_gate_XxDxF = _param(self, "w_gate", (x, d, f), ("expert", "embed", "expert_mlp"), init, c)
    w_up_XxDxF = _param(self, "w_up", (x, d, f), ("expert", "embed", "expert_mlp"), init, c)
    w_down_XxFxD = _param(self, "w_down", (x, f, d), ("expert", "expert_mlp", "embed"), _fan_in_init(f), c)
    gate_XxGxCxF = _dot("xgcd,xdf->xgcf", in_XxGxCxD, w_gate_XxDxF, c.dtype)
    up_XxGxCxF = _dot("xgcd,xdf->xgcf", in_XxGxCxD, w_up_XxDxF, c.dtype)
    h_XxGxCxF = _swiglu(gate_XxGxCxF, up_XxGxCxF)
    h_XxGxCxF = nn.with_logical_constraint(h_XxGxCxF, ("act_expert", "act_expert_groups", None, "act_expert_mlp"))
    out_XxGxCxD = nn.with_logical_constraint(_dot("xgcf,xfd->xgcd", h_XxGxCxF, w_down_XxFxD, c.dtype), expert_axes)
    y_GxSxD = jnp.einsum("gsxc,xgcd->gsd", combine_GxSxXxC, out_XxGxCxD, preferred_element_type=jnp.float32)
    y_BxTxD = nn.with_logical_constraint(y_GxSxD.reshape(b, t, d), ("act_batch", "act_length", "act_embed"))
    if m.shared_experts:
      y_BxTxD = y_BxTxD + MLP(c, d_ff=m.shared_experts * f, name="shared")(x_BxTxD)
    return y_BxTxD


def moe_stats(moe_collection) -> dict[str, Array]:
  """Each statistic of `route` averaged over the MoE layers whose `moe` collection (as `apply(...,
  mutable=["moe"])` returns it) is given: scalars, and `load` [X]."""
  values = {name: [] for name in MOE_STATS}
  for path, sown in traverse_util.flatten_dict(dict(moe_collection)).items():
    for value in sown:  # sow keeps a tuple; a scanned stack's values carry a leading layer axis
      values[path[-1]].append(value.reshape(-1, *value.shape[value.ndim - (path[-1] == "load") :]))
  return {name: jnp.mean(jnp.concatenate(v, axis=0), axis=0) for name, v in values.items() if v}


class Block(nn.Module):
  cfg: ModelConfig
  moe: bool = False  # an MoE layer: `MoE` in place of the MLP

  @nn.compact
  def __call__(self, x_BxTxD, rope_BxTx1x2xE, mask_BxTxS, cache=None, index=None):
    """(x, cache) -> (x, cache): the (carry, xs) -> (carry, ys) signature nn.scan expects."""
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_length", "act_embed"))
    attn_BxTxD, cache = Attention(self.cfg, name="attn")(
      RMSNorm(self.cfg, name="attn_norm")(x_BxTxD), rope_BxTx1x2xE, mask_BxTxS, cache, index
    )
    x_BxTxD = x_BxTxD + attn_BxTxD
    ffn = MoE(self.cfg, name="moe") if self.moe else MLP(self.cfg, name="mlp")
    x_BxTxD = x_BxTxD + ffn(RMSNorm(self.cfg, name="mlp_norm")(x_BxTxD))
    return x_BxTxD, cache


REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """Token ids [B, T] (with segment ids and positions for packed rows) -> f32 logits [B, T, V], or with
  `head="scalar"` f32 scores [B, T].

  With `cache` (from `init_cache`), the call returns (logits, updated cache): prefill and decoding.
  Every row's T tokens go to the same slots, `cache["index"]` onwards, so rows of different
  lengths are left-padded; token t of row b, at position p, attends to the p + 1 slots ending at its own.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxT: Array,
    segment_ids_BxT: Array | None = None,
    positions_BxT: Array | None = None,
    cache=None,
    return_hidden: bool = False,
  ):
    """With `return_hidden`, returns (final normed hidden states [B, T, D] f32, head [D, V]) for
    `head_loss`, which never holds the whole [B, T, V] logits."""
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
    index = None if cache is None else cache["index"]
    if cache is None:
      # A fused kernel masks by the segment ids itself and never builds the [B, T, T] mask.
      mask_BxTxS = segment_ids_BxT if c.attention in kernels.FUSED else attention_mask(segment_ids_BxT)
    else:
      slot_BxT = index + jnp.arange(tokens_BxT.shape[1])[None, :]
      slots_1x1xS = jnp.arange(cache["v"][0].shape[-2])[None, None, :]
      mask_BxTxS = (slots_1x1xS <= slot_BxT[:, :, None]) & (slots_1x1xS >= (slot_BxT - positions_BxT)[:, :, None])
    rope_BxTx1x2xE = rope_tables(positions_BxT, c.head_dim, c.rope_base)

    block = Block
    if c.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0, "moe": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=c.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, moe=c.moe.is_moe_layer(0), name="layers")
      layers_cache = None if cache is None else (cache["k"], cache["v"])
      x_BxTxD, layers_cache = stack(x_BxTxD, rope_BxTx1x2xE, mask_BxTxS, layers_cache, index)
    else:
      new_k, new_v = [], []
      for i in range(c.n_layers):
        layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
        x_BxTxD, layer_cache = block(c, moe=c.moe.is_moe_layer(i), name=f"layer_{i}")(
          x_BxTxD, rope_BxTx1x2xE, mask_BxTxS, layer_cache, index
        )
        if cache is not None:
          new_k.append(layer_cache[0])
          new_v.append(layer_cache[1])
      layers_cache = None if cache is None else (tuple(new_k), tuple(new_v))

    x_BxTxD = RMSNorm(c, name="final_norm")(x_BxTxD)
    if c.head == "scalar":
      assert not return_hidden, "return_hidden gives the inputs of the LM head's loss"
      # Zero at init: every score is 0, so a Bradley-Terry loss starts at ln 2 whatever the trunk.
      score_D = _param(self, "score", (c.d_model,), ("embed",), nn.initializers.zeros, c)
      scores_BxT = _dot("btd,d->bt", x_BxTxD, score_D, c.dtype)
      out = nn.with_logical_constraint(scores_BxT, ("act_batch", "act_length"))
    else:
      if return_hidden:
        if c.tie_embeddings:
          return x_BxTxD, embed_VxD.T
        head_DxV = _param(self, "head", (c.d_model, c.vocab_size), ("embed", "vocab"), _fan_in_init(c.d_model), c)
        return x_BxTxD, head_DxV
      if c.tie_embeddings:
        logits_BxTxV = _dot("btd,vd->btv", x_BxTxD, embed_VxD, c.dtype)
      else:
        head_DxV = _param(self, "head", (c.d_model, c.vocab_size), ("embed", "vocab"), _fan_in_init(c.d_model), c)
        logits_BxTxV = _project(x_BxTxD, head_DxV, 1, c.dtype)
      out = nn.with_logical_constraint(logits_BxTxV, ("act_batch", "act_length", "act_vocab"))
    if cache is None:
      return out
    return out, {"k": layers_cache[0], "v": layers_cache[1], "index": index + tokens_BxT.shape[1]}


def last_token(x_BxT: Array, segment_ids_BxT: Array) -> Array:
  """x [B, T] at each row's last real token (the last position whose segment id is > 0) -> [B].

  Reward and preference rows hold one right-padded sequence each; a packed row gives its last document's.
  """
  t = segment_ids_BxT.shape[1]
  last_B = jnp.max(jnp.where(segment_ids_BxT > 0, jnp.arange(t), 0), axis=1)
  return jnp.take_along_axis(x_BxT, last_B[:, None], axis=1)[:, 0]


def trunk_params(target: dict, source: dict) -> dict:
  """The leaves of `source` (another run's params) that a model whose params are `target` starts from: every
  one at a path `target` has, as a nested dict (`lm.state`'s `start_params`). Leaves are arrays or
  ShapeDtypeStructs, unboxed. So a reward model (head="scalar") or a LoRA model starts from an LM run.

  Leaves only `target` has must be a scalar head or LoRA adapters (they keep their init); those only
  `source` has are left out (an LM head), unless they are LoRA adapters, which must be merged first
  (`lm.lora.merge_lora`). ValueError naming the leaves for either, and for shapes that differ.
  """
  flat, flat_source = traverse_util.flatten_dict(target, sep="/"), traverse_util.flatten_dict(source, sep="/")
  missing = [k for k in flat if k not in flat_source and not (k == "score" or k.endswith((LORA_A, LORA_B)))]
  if missing:
    raise ValueError(f"the source parameters lack {', '.join(missing)}")
  unplaced = [k for k in flat_source if k not in flat and k.endswith((LORA_A, LORA_B))]
  if unplaced:
    raise ValueError(f"the source's LoRA adapters {', '.join(unplaced)} have no place: merge them first")
  differ = [k for k in flat if k in flat_source and flat[k].shape != flat_source[k].shape]
  if differ:
    shapes = ", ".join(f"{k} {flat_source[k].shape} (want {flat[k].shape})" for k in differ)
    raise ValueError(f"the source parameters' shapes differ: {shapes}")
  return traverse_util.unflatten_dict({k: v for k, v in flat_source.items() if k in flat}, sep="/")


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """An empty KV cache of `length` slots in the compute dtype, and `index`, the next slot to fill.

  Per layer, keys are [B * K, E, S] and values [B * K, S, E]. With `scan_layers` each is one
  stacked [L, ...] array; otherwise a tuple of L arrays, which a decode step updates in place.
  """
  q = batch * cfg.n_kv_heads
  shapes = {"k": (q, cfg.head_dim, length), "v": (q, length, cfg.head_dim)}
  if cfg.scan_layers:
    cache = {name: jnp.zeros((cfg.n_layers, *shape), cfg.dtype) for name, shape in shapes.items()}
  else:
    cache = {name: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers)) for name, shape in shapes.items()}
  return {**cache, "index": jnp.zeros((), jnp.int32)}


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array, z_loss: float = 0.0) -> tuple[Array, Array]:
  """Per-token (cross-entropy + z_loss * logZ^2, logZ) in f32."""
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  loss_BxT = log_z_BxT - target_logit_BxT
  if z_loss:
    loss_BxT = loss_BxT + z_loss * jnp.square(log_z_BxT)
  return loss_BxT, log_z_BxT


LOSS_CHUNKS = 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_loss(
  x_BxTxD: Array, head_DxV: Array, targets_BxT: Array, weights_BxT: Array, z_loss: float, dtype: str
) -> tuple[Array, Array]:
  """(sum of weights * (cross-entropy + z_loss * logZ^2), sum of weights * cross-entropy) of the
  logits x @ head, computed over `LOSS_CHUNKS` chunks of positions so the [B, T, V] logits never
  exist at once (fewer, larger chunks keep the matmuls efficient: 4 ran fastest on CPU, 16 slowest).

  The gradient with respect to x and head is computed in the forward pass, chunk by chunk, while
  each chunk's logits are at hand (the backward pass only scales it), as fused linear
  cross-entropy kernels do. Only the first output is differentiated; the second is for logging.
  """
  return _head_loss_fwd(x_BxTxD, head_DxV, targets_BxT, weights_BxT, z_loss, dtype)[0]


@jax.named_scope("head_loss")
def _head_loss_fwd(x_BxTxD, head_DxV, targets_BxT, weights_BxT, z_loss, dtype):
  b, t, d = x_BxTxD.shape
  n = max(c for c in range(1, min(t, LOSS_CHUNKS) + 1) if t % c == 0)
  chunk = t // n
  # Chunks along positions, not rows: each chunk keeps the whole (data-sharded) batch. The loop is
  # unrolled: XLA schedules the chunks freely, and its cost model (lm plan) prices straight-line code.
  xs_NxBxCxD = x_BxTxD.reshape(b, n, chunk, d).swapaxes(0, 1)
  targets_NxBxC, weights_NxBxC = (a.reshape(b, n, chunk).swapaxes(0, 1) for a in (targets_BxT, weights_BxT))

  def body(carry, chunk_inputs):
    d_head_DxV, objective, ce = carry
    x_BxCxD, targets_BxC, weights_BxC = chunk_inputs
    logits_BxCxV = _project(x_BxCxD, head_DxV, 1, dtype)
    logits_BxCxV = nn.with_logical_constraint(logits_BxCxV, ("act_batch", "act_length", "act_vocab"))
    max_BxCx1 = jnp.max(logits_BxCxV, axis=-1, keepdims=True)
    exp_BxCxV = jnp.exp(logits_BxCxV - max_BxCx1)
    sum_BxCx1 = jnp.sum(exp_BxCxV, axis=-1, keepdims=True)
    log_z_BxC = (jnp.log(sum_BxCx1) + max_BxCx1)[..., 0]
    is_target_BxCxV = targets_BxC[..., None] == jnp.arange(logits_BxCxV.shape[-1])
    target_logit_BxC = jnp.sum(jnp.where(is_target_BxCxV, logits_BxCxV, 0.0), axis=-1)
    ce_BxC = log_z_BxC - target_logit_BxC
    # d/dlogits of w * (logZ - logit_target + z * logZ^2) = w * ((1 + 2 z logZ) softmax - onehot).
    scale_BxCx1 = (weights_BxC * (1.0 + 2.0 * z_loss * log_z_BxC))[..., None] / sum_BxCx1
    d_logits_BxCxV = exp_BxCxV * scale_BxCx1 - jnp.where(is_target_BxCxV, weights_BxC[..., None], 0.0)
    d_x_BxCxD = _project(d_logits_BxCxV, head_DxV.T, 1, dtype)
    d_head_DxV = d_head_DxV + _bmm(
      x_BxCxD.reshape(-1, d).T, d_logits_BxCxV.reshape(-1, d_logits_BxCxV.shape[-1]), dtype
    )
    objective = objective + jnp.sum(weights_BxC * (ce_BxC + z_loss * jnp.square(log_z_BxC)))
    return (d_head_DxV, objective, ce + jnp.sum(weights_BxC * ce_BxC)), d_x_BxCxD

  zero = jnp.zeros((), jnp.float32)
  init = (jnp.zeros(head_DxV.shape, jnp.float32), zero, zero)
  (d_head_DxV, objective, ce), d_xs_NxBxCxD = jax.lax.scan(
    body, init, (xs_NxBxCxD, targets_NxBxC, weights_NxBxC), unroll=True
  )
  d_x_BxTxD = d_xs_NxBxCxD.swapaxes(0, 1).reshape(b, t, d)
  return (objective, ce), (d_x_BxTxD, d_head_DxV.astype(head_DxV.dtype), targets_BxT, weights_BxT)


def _head_loss_bwd(z_loss, dtype, res, cotangents):
  d_x_BxTxD, d_head_DxV, targets_BxT, weights_BxT = res
  d_objective = cotangents[0]
  no_d_targets_BxT = np.zeros(targets_BxT.shape, jax.dtypes.float0)  # integer inputs take float0 cotangents
  d_x_BxTxD, d_head_DxV = ((g * d_objective).astype(g.dtype) for g in (d_x_BxTxD, d_head_DxV))
  return d_x_BxTxD, d_head_DxV, no_d_targets_BxT, jnp.zeros_like(weights_BxT)


head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


@functools.partial(jax.jit, static_argnames=("model",))
def forward(model: Transformer, params, batch: dict) -> Array:
  """Logits for a batch dict; a convenience for tests and tools, not the train step."""
  return model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
