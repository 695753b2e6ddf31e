"""The one place that maps logical axis names onto the device mesh.

A mesh has four axes: `data` (pure data parallelism), `expert` (expert parallelism: an MoE layer's
experts split over it, and everywhere else it splits the batch like `data`), `fsdp` (data parallelism
whose parameters and optimizer state are sharded too) and `tensor` (Megatron-style sharding of heads,
MLP and vocabulary). A new layout is an edit of `RULES`, not of the model.
"""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lm import config as config_lib

MESH_AXES = config_lib.MESH_AXES  # ("data", "expert", "fsdp", "tensor")

# logical axis -> mesh axes. Parameters first, then activations.
RULES = (
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("expert", "expert"),
  ("expert_mlp", "tensor"),
  ("act_batch", ("data", "expert", "fsdp")),
  ("act_expert", "expert"),  # an MoE layer's tokens, dispatched to their experts [experts, groups, capacity, D]
  ("act_expert_groups", ("data", "fsdp")),  # ... and their groups: the `expert` axis moved onto the experts
  ("act_expert_mlp", "tensor"),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A (data, expert, fsdp, tensor) mesh over `devices` (default: all), sized by `mesh.*`."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(cfg, len(devices))
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_for(model_cfg, mesh: Mesh) -> tuple:
  """RULES, minus mappings whose dimension the mesh axis does not divide (those replicate)."""
  sizes = {
    "vocab": model_cfg.vocab_size,
    "embed": model_cfg.d_model,
    "heads": model_cfg.n_heads,
    "kv_heads": model_cfg.n_kv_heads,
    "mlp": model_cfg.d_ff,
    "act_heads": model_cfg.n_heads,
    "act_mlp": model_cfg.d_ff,
    "act_vocab": model_cfg.vocab_size,
    "expert": model_cfg.moe.experts or 1,
    "act_expert": model_cfg.moe.experts or 1,
    "expert_mlp": model_cfg.moe.expert_d_ff(model_cfg.d_ff),
    "act_expert_mlp": model_cfg.moe.expert_d_ff(model_cfg.d_ff),
  }
  rules = []
  for name, axes in RULES:
    if name in sizes and axes is not None:
      axis_size = int(np.prod([mesh.shape[a] for a in np.atleast_1d(axes)]))
      if sizes[name] % axis_size:
        axes = None
    rules.append((name, axes))
  return tuple(rules)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays, [B, T] or [B] (a preference batch's margins): rows split over every data-parallel device."""
  return NamedSharding(mesh, PartitionSpec(("data", "expert", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a batch's rows split: the devices of `batch_sharding`'s axes."""
  return mesh.shape["data"] * mesh.shape["expert"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
