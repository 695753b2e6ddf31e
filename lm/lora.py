"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): which parameters a LoRA run
trains, and folding trained adapters back into the base weights.

The adapters live in the model (`lm.model`): with `ModelConfig.lora_rank` R > 0, each projection named in
`ModelConfig.lora_targets` (wq, wk, wv, wo of attention; w_gate, w_up, w_down of the MLP) gets A [in..., R],
random, and B [R, out...], zero, stored beside its weight W as `W_lora_a` and `W_lora_b`, and its output
becomes x W + (lora_alpha / R) (x A) B. B = 0 makes a fresh adapter model compute exactly the base model's
function. A and B carry W's logical axis names (the rank axis unnamed, replicated), so
`lm.partitioning.RULES` shards them as it shards W and a new layout needs no LoRA edit.

Written here rather than with qwix (google/qwix, whose LoRA provider `pip download qwix` fetches here as
qwix 0.1.8): qwix adds adapters by intercepting the jnp/lax matmuls a module calls and matching module paths
by regex. This model multiplies reshaped 2-D views of its weights (`_project`) and runs attention's own
matmuls in a custom VJP inside the same module, so the intercepted operands are neither the weights' shapes
nor their logical axes; adapters named in linen next to their weights keep both, need no extra dependency,
and leave `lm.model` readable as the one description of the parameters.

A training loop has two ways to train only the adapters:
- differentiate only the trainable tree: `trainable, frozen = partition(params)`, then
  `jax.grad(lambda t: loss(combine(t, frozen)))(trainable)`. No gradient of a frozen weight is computed
  (4 FLOPs per frozen weight and token instead of 6, see `lm.flops.flops_per_token_computed`), the
  optimizer state exists for the trainable leaves only, and `trainable` is what a checkpoint must keep;
- keep one tree and mask the optimizer with `lora_mask`: `optax.multi_transform({True: tx, False:
  optax.set_to_zero()}, lora_mask(params))`. Not `optax.masked(tx, mask)` alone: it passes the frozen
  leaves' raw gradients through as their updates.

`lm train` takes the first (`split`): the state keeps the whole params, so evaluation, sampling and
`lm.workdir.load_params` see one tree as for any run, and the step alone splits them, differentiates and
updates the trained part and joins them again, so the base weights pass through untouched. The second would
compute and hold a gradient of every base weight (a full fine-tune's FLOPs and temporaries) only to zero it,
and a checkpoint would still have to leave the base weights out. A LoRA run's checkpoint holds `setup.saved(state)`:
the trained part, optimizer state, counters and a pointer to the base run (`lm.workdir`); `lm lora merge`
(`lm.lora_cli`) folds the adapters into a plain run.
"""

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from lm.model import LORA_A, LORA_B, ModelConfig


def _trainable(name: str) -> bool:
  """A LoRA run trains its adapters, and a scalar head or a PPO value head, which no base run has to freeze."""
  return name.endswith((LORA_A, LORA_B)) or name in ("score", "value_head")


def lora_mask(params):
  """True on the leaves a LoRA run trains: the adapters, and `score` in a scalar-head model (a reward model
  starts with a new head). Same tree structure as `params`, boxed or not, like `lm.optim.decay_mask`."""

  def keep(path, _):
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]  # skips box attributes
    return _trainable(names[-1])

  return jax.tree_util.tree_map_with_path(keep, params)


def partition(params: dict) -> tuple[dict, dict]:
  """(trainable, frozen): the nested dict of `params` split by `lora_mask`, each holding only its leaves."""
  flat = traverse_util.flatten_dict(params)
  trainable = {path: x for path, x in flat.items() if _trainable(path[-1])}
  frozen = {path: x for path, x in flat.items() if not _trainable(path[-1])}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
  """The params `partition` (or `split`) split, whole again."""
  if not frozen:
    return trainable
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})


def split(model_cfg: ModelConfig, params: dict) -> tuple[dict, dict]:
  """(trained, base) params of a model of `model_cfg`: `partition(params)` with LoRA (lora_rank > 0), else
  (params, {}), as every param of another model trains. `combine` joins them again."""
  return partition(params) if model_cfg.lora_rank else (params, {})


def merge_lora(params: dict, cfg: ModelConfig) -> dict:
  """Params of a model of `cfg` (lora_rank R > 0; unboxed nested dicts) -> the params of the same function
  for `dataclasses.replace(cfg, lora_rank=0)`: each adapted W becomes W + (lora_alpha / R) A B, computed in
  f32, and the adapters are dropped. Scanned layers (a leading layers axis on W, A and B) merge per layer."""
  assert cfg.lora_rank > 0, "merge_lora needs a model with LoRA adapters"
  scale = cfg.lora_alpha / cfg.lora_rank
  flat = traverse_util.flatten_dict(params)
  merged = {}
  for path, w in flat.items():
    if path[-1].endswith((LORA_A, LORA_B)):
      continue
    a_path, b_path = (*path[:-1], path[-1] + LORA_A), (*path[:-1], path[-1] + LORA_B)
    if a_path in flat:
      w = (w.astype(jnp.float32) + scale * _product(flat[a_path], flat[b_path], w.shape)).astype(w.dtype)
    merged[path] = w
  return traverse_util.unflatten_dict(merged)


def _product(a: jax.Array, b: jax.Array, w_shape: tuple) -> jax.Array:
  """A [lead..., in..., R] @ B [lead..., R, out...] -> [lead..., in..., out...] = `w_shape`, in f32."""
  lead = a.ndim + b.ndim - 2 - len(w_shape)  # 1 with scanned layers, else 0
  n = math.prod(w_shape[:lead])
  a_NxIxR = a.reshape(n, -1, a.shape[-1]).astype(jnp.float32)
  b_NxRxO = b.reshape(n, b.shape[lead], -1).astype(jnp.float32)
  return jnp.matmul(a_NxIxR, b_NxRxO, precision=jax.lax.Precision.HIGHEST).reshape(w_shape)
