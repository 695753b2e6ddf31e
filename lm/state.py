"""The train state and everything derived from a config before any array exists.

`build` makes the model, the optimizer, the sharding rules and the state's shardings from a
config, a vocabulary size, a mesh and an objective: the objective's `init_params` gives the
trained params (the model's and any it adds) and its `frozen` the trees held fixed beside them
(a DPO reference), both sharded by the same logical rules. The state is created by
`eval_shape -> shardings -> jit(out_shardings)`, so no process ever holds it whole.

A LoRA model's (`model.lora_rank` > 0) params hold its base weights too, but only the adapters train
(`lm.lora.split`): the optimizer state is theirs alone, and a checkpoint holds `Setup.saved(state)`,
without the base weights, which `lm.workdir` loads back from the base run.
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util
from jax.sharding import Mesh

from lm import kernels, lora, objectives, optim, partitioning
from lm.model import ModelConfig, Transformer


@flax.struct.dataclass
class TrainState:
  """The whole training state; batches consumed = `step + skipped_steps` = the checkpoint's step."""

  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any  # all of the model's, a LoRA model's base weights included
  opt_state: Any  # for the trained params (`lm.lora.split`)
  rng: jax.Array  # uint32 key data, split every batch: one half for the step's randomness, one kept here
  skipped_steps: jax.Array  # int32 scalar: batches whose update was skipped for a non-finite loss or gradient
  nonfinite_streak: jax.Array  # int32 scalar: how many of the latest batches in a row were skipped
  schedule: optim.ScheduleClock  # where the run is in its lr schedule (stretched when a resume changes its length)
  frozen: Any  # the objective's fixed trees (a DPO reference), checkpointed with the rest; {} for most objectives


@dataclasses.dataclass
class Setup:
  """Everything derived from a config, a vocabulary size, a mesh and an objective, before any array exists."""

  cfg: ml_collections.ConfigDict
  model_cfg: ModelConfig
  model: Transformer
  objective: objectives.Objective
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: tuple
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying shardings

  def init_state(self, start_params: dict | None = None) -> TrainState:
    """A freshly initialised state, created directly in its sharded layout.

    `start_params` (a nested dict of arrays, e.g. another run's params) replaces the initial value of
    every param it holds, before the objective makes its frozen trees from them; the rest start fresh.
    """

    def init(key, start):
      return nn.unbox(_init(self.model, self.objective, self.tx, key, self.cfg, start))

    with self.context():
      return jax.jit(init, out_shardings=self.state_shardings)(jax.random.key(self.cfg.train.seed), start_params or {})

  def context(self):
    return _Context(self.mesh, self.rules)

  def saved(self, state: TrainState) -> TrainState:
    """What a checkpoint holds of `state` (or of `abstract_state`): all of it but a LoRA model's base weights."""
    return state.replace(params=lora.split(self.model_cfg, state.params)[0])


class _Context:
  """`jax.set_mesh` plus linen's logical axis rules, for tracing and running steps."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._mesh = jax.set_mesh(self.mesh)
    self._mesh.__enter__()
    self._rules = nn.logical_axis_rules(self.rules)
    self._rules.__enter__()

  def __exit__(self, *exc):
    self._rules.__exit__(*exc)
    self._mesh.__exit__(*exc)


def with_values(boxed: dict, values: dict) -> dict:
  """`boxed` (params as `model.init` returns them) with the leaves that `values` holds replaced, boxes kept."""
  flat = traverse_util.flatten_dict(boxed)
  for path, value in traverse_util.flatten_dict(values).items():
    leaf = flat[path]
    flat[path] = leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
  return traverse_util.unflatten_dict(flat)


def _init(model: Transformer, objective, tx, key, cfg, start_params: dict) -> TrainState:
  init_key, train_key = jax.random.split(key)
  params = with_values(objective.init_params(model, init_key), start_params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(lora.split(model.cfg, nn.unbox(params))[0]),
    rng=jax.random.key_data(train_key),
    skipped_steps=jnp.zeros((), jnp.int32),
    nonfinite_streak=jnp.zeros((), jnp.int32),
    schedule=optim.fresh_clock(cfg, optim.run_steps(cfg, model.cfg)),
    frozen=objective.frozen(params),
  )


def build(
  cfg: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh, objective: objectives.Objective | None = None
) -> Setup:
  """Model, optimizer, sharding rules and the state's shardings, without allocating it.

  `objective` defaults to the one `train.objective` names.
  """
  objective = objectives.create(cfg) if objective is None else objective
  model_cfg = objective.model_config(ModelConfig.from_config(cfg, vocab_size))
  platform = mesh.devices.flat[0].platform
  attention = kernels.resolve(cfg.model.attention, platform, cfg.data.seq_len, model_cfg.dtype, model_cfg.head_dim)
  model_cfg = dataclasses.replace(model_cfg, attention=attention)
  model = Transformer(model_cfg)
  tx = optim.make_optimizer(cfg)
  rules = partitioning.rules_for(model_cfg, mesh)
  boxed = jax.eval_shape(lambda key: _init(model, objective, tx, key, cfg, {}), jax.random.key(0))
  param_shardings = partitioning.logical_shardings(boxed.params, mesh, rules)
  replicated = partitioning.replicated(mesh)
  trained_shardings = lora.split(model_cfg, param_shardings)[0]
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (no moments for frozen params: optim.trainable)
  opt_shardings = optax.tree_map_params(
    tx,
    lambda x, sharding: x if masked(x) else sharding,
    boxed.opt_state,
    trained_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=masked,
  )
  shardings = TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=opt_shardings,
    rng=replicated,
    skipped_steps=replicated,
    nonfinite_streak=replicated,
    schedule=jax.tree.map(lambda _: replicated, boxed.schedule),
    frozen=partitioning.logical_shardings(boxed.frozen, mesh, rules),
  )
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return Setup(cfg, model_cfg, model, objective, tx, mesh, rules, shardings, abstract)
