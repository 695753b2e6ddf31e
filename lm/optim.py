"""The run's length, its learning-rate schedule, and the AdamW chain (clipping, decoupled, masked weight decay).

A run's length is `run_steps`: `train.steps`, or fewer when a token or FLOP budget (`train.max_tokens`,
`train.max_flops`) runs out first. The schedule spans exactly that length, so a budget-capped run ends its
decay at its last step. `train.stop_at_step` is not a length but a stop request: the run stops there and
its schedule is the one of its full length (`lm sweep` stops a WSD source in its stable phase this way,
for a cooldown branch to start from).

Where a run is in its schedule is a `ScheduleClock`, part of the train state. When a resumed run's length
changes (more `train.steps`, another budget, or a branch's own `train.steps`), the first step after the
resume, at step r, re-sets the clock:
- if the new length's own schedule has the same lr at r (still in warmup, in WSD's stable phase, or a
  constant schedule), the run continues on the new length's schedule, as if configured so from the start;
- otherwise the rest of the current schedule, from r on, is stretched (or squeezed) linearly onto the new
  remaining steps: the lr is continuous at r and reaches its final value at the new last step. A run resumed
  after it ended (its lr already final) therefore goes on at the final lr.
The clock is checkpointed with the state, so a second resume stretches the stretched schedule again and an
interrupted run resumes bit for bit.
"""

import math
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lm import flops as flops_lib


def run_steps(cfg: ml_collections.ConfigDict, model_cfg) -> int:
  """The run's length in optimizer steps: `train.steps`, capped by `train.max_tokens` and `train.max_flops`.

  `model_cfg` (an `lm.model.ModelConfig`) gives the FLOPs per token that a FLOP budget is counted in.
  """
  t = cfg.train
  tokens_per_step = t.batch_size * cfg.data.seq_len
  steps = t.steps
  if t.max_tokens:
    steps = min(steps, math.ceil(t.max_tokens / tokens_per_step))
  if t.max_flops:
    flops_per_token = flops_lib.flops_per_token(model_cfg, cfg.data.seq_len, t.flops_convention)
    steps = min(steps, math.ceil(t.max_flops / (flops_per_token * tokens_per_step)))
  return steps


@flax.struct.dataclass
class ScheduleClock:
  """Step s reads the base schedule (warmup, then a decay from `decay_start` to `decay_end`) at position
  `anchor_pos + (s - anchor_step) * rate`; all fields are scalars."""

  total: jax.Array  # int32: the run length the clock is set for
  anchor_step: jax.Array  # int32: the step the current stretch starts at (0 for a run on its own schedule)
  anchor_pos: jax.Array  # float32: the base schedule's position at anchor_step
  rate: jax.Array  # float32: base-schedule steps per step from anchor_step on
  decay_start: jax.Array  # int32: where the base schedule's decay begins (end of warmup; WSD: its cooldown start)
  decay_end: jax.Array  # int32: the base schedule's length, where its lr reaches lr * final_lr_fraction


def fresh_clock(cfg: ml_collections.ConfigDict, total: int) -> ScheduleClock:
  """The clock of a run that follows the schedule of its own length `total` from step 0."""
  o = cfg.optim
  if o.schedule == "wsd":  # warmup, stable at peak, then decay over the last cooldown_fraction of steps
    decay_start = total - max(int(round(o.cooldown_fraction * total)), 1)
  else:
    decay_start = min(o.warmup_steps, total)
  return ScheduleClock(
    total=jnp.asarray(total, jnp.int32),
    anchor_step=jnp.zeros((), jnp.int32),
    anchor_pos=jnp.zeros((), jnp.float32),
    rate=jnp.ones((), jnp.float32),
    decay_start=jnp.asarray(decay_start, jnp.int32),
    decay_end=jnp.asarray(total, jnp.int32),
  )


def position(clock: ScheduleClock, step) -> jax.Array:
  return clock.anchor_pos + (jnp.asarray(step, jnp.int32) - clock.anchor_step).astype(jnp.float32) * clock.rate


def learning_rate(cfg: ml_collections.ConfigDict, clock: ScheduleClock, step) -> jax.Array:
  """The lr of the update at `step` (0-based): linear warmup to `optim.lr`, then cosine, WSD or constant,
  ending at lr * final_lr_fraction."""
  o = cfg.optim
  peak, final = o.lr, o.lr * o.final_lr_fraction
  pos = position(clock, step)
  warmup = jnp.minimum(o.warmup_steps, clock.decay_end)
  warm = peak * jnp.minimum(1.0, (pos + 1) / jnp.maximum(warmup, 1))
  frac = jnp.clip((pos - clock.decay_start) / jnp.maximum(clock.decay_end - clock.decay_start, 1), 0.0, 1.0)
  if o.schedule == "constant":
    lr = jnp.full((), peak, jnp.float32)
  elif o.schedule == "cosine":
    lr = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  else:
    shape = frac if o.cooldown_shape == "linear" else jnp.sqrt(frac)  # 1-sqrt: lr ~ 1 - sqrt(frac)
    lr = peak - (peak - final) * shape
  return jnp.where(pos < warmup, warm, lr)


def reset_clock(cfg: ml_collections.ConfigDict, clock: ScheduleClock, step, total: int) -> ScheduleClock:
  """The clock for a run of `total` steps from `step` on: `clock` itself if set for `total`, else the new
  length's own clock if its lr at `step` is the current one, else the current schedule's rest stretched onto
  the steps from `step` to `total` (see the module docstring)."""
  step = jnp.asarray(step, jnp.int32)
  fresh = fresh_clock(cfg, total)
  now = learning_rate(cfg, clock, step)
  same_lr = jnp.abs(learning_rate(cfg, fresh, step) - now) <= 1e-6 * cfg.optim.lr
  pos = position(clock, step)
  stretched = clock.replace(
    total=fresh.total,
    anchor_step=step,
    anchor_pos=pos,
    rate=jnp.maximum(clock.decay_end - pos, 0.0) / jnp.maximum(total - step, 1).astype(jnp.float32),
  )
  new = jax.tree.map(lambda a, b: jnp.where(same_lr, a, b), fresh, stretched)
  return jax.tree.map(lambda a, b: jnp.where(clock.total == total, a, b), clock, new)


def make_schedule(cfg: ml_collections.ConfigDict, total: int | None = None) -> optax.Schedule:
  """The lr by step of a run of `total` steps (default `train.steps`) on its own schedule."""
  clock = fresh_clock(cfg, cfg.train.steps if total is None else total)
  return lambda step: learning_rate(cfg, clock, step)


def decay_mask(params, cfg: ml_collections.ConfigDict):
  """True for the parameters weight decay applies to: matrices, and optionally norms/embeddings."""

  def keep(path, _):
    names = param_path(path).split("/")
    if names[-1] == "scale":
      return cfg.optim.decay_norms
    if names[-1] == "embed":
      return cfg.optim.decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(keep, params)


def param_path(path) -> str:
  """A parameter's path as "layer_3/attn/wq" (box attributes skipped)."""
  return "/".join(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def frozen_mask(params, cfg: ml_collections.ConfigDict):
  """True for the parameters `optim.trainable` (a regex searched in each path) leaves out; all False when empty."""
  pattern = re.compile(cfg.optim.trainable) if cfg.optim.trainable else None
  frozen = lambda path, _: bool(pattern) and not pattern.search(param_path(path))  # noqa: E731
  return jax.tree_util.tree_map_with_path(frozen, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW at unit learning rate: the train step multiplies its updates by `learning_rate` of the state's clock.
  Parameters `optim.trainable` leaves out get zero updates and no Adam moments (their gradients still count in the
  clipped norm)."""
  o = cfg.optim
  adamw = optax.adamw(
    1.0,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    mask=lambda params: decay_mask(params, cfg),
  )
  if o.trainable:
    frozen = lambda params: frozen_mask(params, cfg)  # noqa: E731
    trained = lambda params: jax.tree.map(lambda f: not f, frozen(params))  # noqa: E731
    adamw = optax.chain(optax.masked(adamw, trained), optax.masked(optax.set_to_zero(), frozen))
  if o.clip_norm:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return adamw
