"""Fused attention for accelerators: Pallas splash attention on TPU, cuDNN's fused attention on GPU.

`model.attention` picks the implementation of the training forward pass's attention (prefill and
decoding with a KV cache always use `lm.model`'s own):
- `xla`: `lm.model._attend`, jax.numpy in 128-query causal blocks with a hand-written backward pass.
  It holds a block's [128, T] scores in memory; it is the fastest path on CPU.
- `splash`: JAX's Pallas splash-attention kernel (TPU), forward and backward, causal mask and segment
  ids, never holding the [T, T] scores. Under a mesh it runs per shard (`jax.shard_map`): rows split as
  the batch is, heads over `tensor` when the kv heads divide evenly.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU), causal, packed rows masked.
- `auto` (the default): splash on TPU and cuDNN on GPU where the shapes allow it, else xla.

`resolve` turns `auto` into one of them for a run's devices, and rejects a choice the devices or shapes
cannot run in one line. `attention_cost` counts the splash kernel's FLOPs and bytes by formula, for
`lm plan`: XLA's cost model does not see inside a custom call.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.config import ATTENTION
from lm.errors import UserError

FUSED = ("splash", "cudnn")
PLATFORM = {"splash": "tpu", "cudnn": "gpu"}
SPLASH_BLOCK = 128  # query and key block of the splash kernels (their default)


def splash_unsupported(seq_len: int) -> str:
  """Why splash attention cannot run rows of `seq_len` tokens, or ''."""
  if seq_len % SPLASH_BLOCK:
    return f"splash attention needs data.seq_len to be a multiple of {SPLASH_BLOCK}, got {seq_len}"
  return ""


def cudnn_unsupported(dtype: str, head_dim: int) -> str:
  """Why cuDNN's fused attention cannot run these shapes, or ''."""
  if dtype not in ("bfloat16", "float16"):
    return f"cuDNN's fused attention computes in bfloat16 or float16, not model.dtype={dtype}"
  if head_dim % 8 or head_dim > 128:
    return f"cuDNN's fused attention needs a head dimension that is a multiple of 8 up to 128, got {head_dim}"
  return ""


def resolve(choice: str, platform: str, seq_len: int, dtype: str, head_dim: int) -> str:
  """The attention a run on `platform` devices (`cpu`, `gpu`, `tpu`) uses for `model.attention=choice`."""
  if choice not in ATTENTION:
    raise UserError(f"model.attention must be one of {ATTENTION}, got {choice!r}")
  why_not = {"splash": splash_unsupported(seq_len), "cudnn": cudnn_unsupported(dtype, head_dim)}
  if choice == "auto":
    fused = [name for name in FUSED if PLATFORM[name] == platform and not why_not[name]]
    return fused[0] if fused else "xla"
  if choice in FUSED and PLATFORM[choice] != platform:
    raise UserError(
      f"model.attention={choice!r} runs on {PLATFORM[choice].upper()}, and this run's devices are {platform}: "
      "use model.attention=auto or xla"
    )
  if choice in FUSED and why_not[choice]:
    raise UserError(f"model.attention={choice!r}: {why_not[choice]}")
  return choice


def attention(
  kind: str, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, interpret: bool = False, cudnn: str = "cudnn"
):
  """Causal attention of pre-scaled queries within each row's segments by a fused kernel: [B, T, H, E] out.

  `interpret` runs the Pallas kernel in interpret mode (CPU tests); `cudnn` names
  `jax.nn.dot_product_attention`'s implementation (tests on CPU pass `xla` to check the layouts and mask).
  """
  if kind == "splash":
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BxTxHxE, k_BxTxKxE, v_BxTxKxE))
    return splash(q, k, v, segment_ids_BxT, interpret).transpose(0, 2, 1, 3)
  if kind == "cudnn":
    same_Bx1xTxS = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
      q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask=same_Bx1xTxS, scale=1.0, is_causal=True, implementation=cudnn
    )
  raise ValueError(f"no fused attention {kind!r}")


def splash(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, segment_ids_BxT, interpret: bool = False):
  """Splash attention, causal and within segments, [B, H, T, E] out; per shard under a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _splash_local(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, segment_ids_BxT, interpret)
  batch, heads = splash_partition(mesh, q_BxHxTxE.shape[1], k_BxKxTxE.shape[1])
  rows_heads = P(batch, heads)  # of q, k, v and the output alike
  local = jax.shard_map(
    lambda q, k, v, s: _splash_local(q, k, v, s, interpret),
    mesh=mesh,
    in_specs=(rows_heads, rows_heads, rows_heads, P(batch)),
    out_specs=rows_heads,
    check_vma=False,
  )
  return local(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, segment_ids_BxT)


def splash_partition(mesh, n_heads: int, n_kv_heads: int) -> tuple:
  """(mesh axes of the rows, mesh axis of the heads or None) the kernel runs per shard of.

  Rows split as linen's rules split `act_batch`. Heads split as `act_heads` does only when the kv heads
  divide too: each shard then holds whole groups of query heads with their kv head.
  """
  batch, heads = nn.logical_to_mesh_axes(("act_batch", "act_heads"))
  if heads is not None and n_kv_heads % shards(mesh, heads):
    heads = None
  return batch, heads


def shards(mesh, spec) -> int:
  """How many ways the mesh axis or axes of one partition-spec entry (None, a name, or a tuple) split."""
  names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return math.prod(mesh.shape[a] for a in names)


def _splash_local(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, segment_ids_BxT, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415 (imports Pallas)
    splash_attention_kernel as kernel_lib,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib  # noqa: PLC0415

  h, t = q_BxHxTxE.shape[1:3]
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, t))] * h)
  kernel = kernel_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)

  def row(q_HxTxE, k_KxTxE, v_KxTxE, segment_ids_T):
    return kernel(q_HxTxE, k_KxTxE, v_KxTxE, segment_ids=kernel_lib.SegmentIds(segment_ids_T, segment_ids_T))

  return jax.vmap(row)(q_BxHxTxE, k_BxKxTxE, v_BxKxTxE, segment_ids_BxT.astype(jnp.int32))


def attention_cost(batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, itemsize: int) -> dict:
  """FLOPs and HBM bytes of the splash kernels on `batch` rows of `heads` query heads (one device's share).

  Causal blocks: of the (T / 128)^2 query x key blocks, the kernels compute the n (n + 1) / 2 on or
  below the diagonal. Forward: q k^T and p v, 2 matmuls; backward: the dq kernel recomputes q k^T and
  runs dO v^T and dS k (3), the dkv kernel recomputes q k^T and runs dO v^T, p^T dO and dS^T q (4).
  Bytes: each query block reads its keys and values once per block pair, and q, o, dO, dq... once.
  """
  n = seq_len // SPLASH_BLOCK
  pairs = n * (n + 1) / 2 * SPLASH_BLOCK**2  # query x key positions computed per head
  matmul = 2 * batch * heads * pairs * head_dim  # FLOPs of one [T, T] x E matmul over the computed blocks
  kv_reads = batch * heads * n * (n + 1) / 2 * SPLASH_BLOCK * head_dim * itemsize  # one of k or v, every block
  rows = batch * heads * seq_len * head_dim * itemsize  # one [B, H, T, E] array
  kv_rows = batch * kv_heads * seq_len * head_dim * itemsize
  return {
    "forward_flops": 2 * matmul,
    "backward_flops": 7 * matmul,
    "forward_bytes": 2 * kv_reads + 2 * rows,  # k, v per block; q in, o out
    "backward_bytes": 2 * (2 * kv_reads) + 4 * rows + 2 * kv_rows,  # both kernels read k, v; q, o, dO, dq; dk, dv
  }
