"""Training objectives: what a run learns, as data plus pure functions, behind one interface.

`train.objective` names one of `REGISTRY`. An objective supplies its train batches, its loss, its
evaluation, any params it adds to the model's and any trees it holds fixed; `lm.state` builds the
state from it, `lm.step` the train step around its loss, and `lm.loop` runs it without knowing
which it is. An objective never writes files or handles signals.

To add one: subclass `Objective` in a module of this package, override what differs, and add its
name here. This module imports nothing heavy, so that config validation can read `REGISTRY`.
"""

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import ml_collections

from lm.errors import UserError

REGISTRY = {  # train.objective -> "module:class"
  "lm": "lm.objectives.lm:NextToken",
  "reward": "lm.objectives.reward:Reward",
  "dpo": "lm.objectives.dpo:DPO",
  "ppo": "lm.objectives.rl:PPO",
  "grpo": "lm.objectives.rl:GRPO",
}


class Batches(Protocol):
  """An endless iterator of this process's train batches (dicts of numpy arrays with a leading batch axis)
  whose position `get_state()` returns as JSON and `set_state` restores exactly."""

  def __next__(self) -> dict: ...
  def __iter__(self) -> Iterator[dict]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


Loss = Callable[[Any, dict, Any, Any], tuple[Any, Any, dict]]


class Objective:
  """The interface, with defaults for what most objectives share; subclasses override the rest."""

  rows_per_example = 1  # rows of a batch that belong together (a preference pair's 2): one microbatch holds them
  row_scalars: tuple[str, ...] = ()  # batch keys beyond the common format, float32 [B] (a preference pair's margin)
  token_arrays: tuple[str, ...] = ()  # batch keys beyond the common format, float32 [B, T] (a rollout's advantages)

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg

  def prepare(self) -> None:
    """Prepares and checks the data before the workdir is touched; data a user got wrong is a UserError here."""

  def model_config(self, model_cfg):
    """The `lm.model.ModelConfig` of the model this objective trains, given the config's: as it is by
    default; a reward model's sets `head="scalar"`."""
    return model_cfg

  def init_params(self, model, key) -> dict:
    """The trained params as `model.init` returns them (logically boxed): the model's, plus any the
    objective adds (a reward head, boxed with its logical axes so it shards by the same rules)."""
    import jax.numpy as jnp  # noqa: PLC0415 (this module stays import-light)

    return model.init(key, jnp.zeros((1, self.cfg.data.seq_len), jnp.int32))["params"]

  def frozen(self, params: dict) -> dict:
    """Trees held fixed through training and passed to the loss (a DPO reference), made from the starting
    params (boxed; after `train.init_from` has set them); checkpointed with the state. None by default."""
    return {}

  def make_loss(self, model) -> Loss:
    """`loss(params, batch, rng, frozen) -> (loss_sum, normaliser, metric_sums)` for `model`, all f32 scalars.

    The step differentiates `loss_sum`, adds sums and normalisers over microbatches, and divides by the
    normaliser (tokens, pairs, ...; it must not depend on params). Each of `metric_sums` is logged as
    `train/NAME` divided by the normaliser; `train/loss` is `loss_sum`'s unless `metric_sums` holds
    "loss". `rng` is a key for the batch's randomness (dropout, sampling).
    """
    raise NotImplementedError

  def train_batches(self, tokenizer, process_index: int, process_count: int) -> Batches:
    """This process's train batches. Built before the workdir is written, so their errors come first."""
    raise NotImplementedError

  def next_batch(self, batches: Batches, state) -> dict:
    """This process's batch for the next step. `state` is the one the step will train (read only): an objective
    whose batches come from the current params (an RL rollout) makes them from it. `next(batches)` by default."""
    return next(batches)

  def log_metrics(self, batches: Batches) -> dict:
    """Metrics the batches measured (an RL rollout's rewards), logged with each log step's. None by default."""
    return {}

  def begin(self, setup, state, batches: Batches, start: int) -> None:
    """Called once the state the run trains from exists (initialised, or restored at step `start`), before
    the first step and `evaluator`. An objective that computes something once from the starting params (DPO's
    reference log-probs) does it here and keeps it with its `batches`, whose state the checkpoints hold.
    `state` is read only: the train step donates it. Nothing by default."""

  def flops_per_token(self, model_cfg) -> tuple[float, float]:
    """(model FLOPs per token under `train.flops_convention`, FLOPs the step computes per token) of a train step,
    for MFU and the FLOP axis of the metrics. A token is a position of a row, padding included (a preference
    pair is two rows). One forward and backward pass by default (`lm.flops`)."""
    from lm import flops  # noqa: PLC0415 (this module stays import-light)

    seq_len, convention = self.cfg.data.seq_len, self.cfg.train.flops_convention
    return flops.flops_per_token(model_cfg, seq_len, convention), flops.flops_per_token_computed(model_cfg, seq_len)

  def evaluator(self, setup, tokenizer, batches: Batches, start: int) -> Callable[[dict], dict]:
    """`evaluate(params) -> {name: float or str}`, run every `train.eval_every` steps and at the end.

    `setup` is the run's `lm.state.Setup`, `batches` its train batches (not to be moved), `start` the
    step the run starts or resumes at. String values are texts (samples), shown in TensorBoard as text.
    """
    raise NotImplementedError


def check(cfg: ml_collections.ConfigDict) -> None:
  """Raises UserError unless `train.objective` names a registered objective."""
  if cfg.train.objective not in REGISTRY:
    raise UserError(f"train.objective must be one of {tuple(REGISTRY)}, got {cfg.train.objective!r}")


def create(cfg: ml_collections.ConfigDict) -> Objective:
  """The objective `train.objective` names, for `cfg` (also a saved config, which validation never saw)."""
  check(cfg)
  module, name = REGISTRY[cfg.train.objective].split(":")
  return getattr(importlib.import_module(module), name)(cfg)
