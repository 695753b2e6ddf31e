"""The train step: a pure `(state, batch) -> (state, metrics)` around an objective's loss, for every objective.

It compiles with `jax.jit` and explicit in/out shardings (pjit). Gradient accumulation, normalisation,
clipping and the update (`lm.optim`), and the skipping of non-finite batches are the same whatever the
objective; the loss is `setup.objective.make_loss(setup.model)`. Only the trained params (`lm.lora.split`:
all of them, or a LoRA model's adapters) are differentiated and updated; the rest pass through as they were.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm import lora, optim, partitioning
from lm.state import Setup, TrainState


def make_train_step(setup: Setup):
  """A jitted `(state, batch) -> (state, metrics)`; the loss is the objective's sum over its normaliser.

  With `optim.grad_accum_steps` = A the batch is split into A interleaved microbatches (`microbatches`) whose summed
  gradients are divided by the whole batch's normaliser: the same update as one batch. A batch whose
  loss or gradient norm is not finite leaves params, optimizer state and `step` as they were and counts
  in `skipped_steps` and `nonfinite_streak` (also returned as metrics). Every batch, skipped or not,
  splits `state.rng` once: the loss gets one half (each microbatch its own fold), the state keeps the
  other. The lr comes from the state's schedule clock, re-set on the first step after a resume that
  changed the run's length (`lm.optim.reset_clock`).
  """
  cfg = setup.cfg
  accum = cfg.optim.grad_accum_steps
  total = optim.run_steps(cfg, setup.model_cfg)
  loss_fn = setup.objective.make_loss(setup.model)

  def differentiated(trained, batch, key, frozen, base):
    loss_sum, normaliser, metric_sums = loss_fn(lora.combine(trained, base), batch, key, frozen)
    return loss_sum, (normaliser, {"loss": loss_sum, **metric_sums})

  grad_fn = jax.grad(differentiated, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    trained, base = lora.split(setup.model_cfg, state.params)
    if accum == 1:
      grads, (normaliser, sums) = grad_fn(trained, batch, step_key, state.frozen, base)
    else:
      micro = jax.tree.map(lambda x: microbatches(x, accum, setup.objective.rows_per_example), batch)

      def body(carry, indexed):
        i, microbatch = indexed
        microbatch = jax.tree.map(
          lambda x: nn.with_logical_constraint(x, ("act_batch",) + (None,) * (x.ndim - 1)), microbatch
        )
        out = grad_fn(trained, microbatch, jax.random.fold_in(step_key, i), state.frozen, base)
        return jax.tree.map(jnp.add, carry, out), None

      zeros = jax.eval_shape(grad_fn, trained, jax.tree.map(lambda x: x[0], micro), step_key, state.frozen, base)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
      (grads, (normaliser, sums)), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    normaliser = jnp.where(normaliser > 0, normaliser, 1.0)  # a batch with nothing to count has a zero loss
    grads = jax.tree.map(lambda g: g / normaliser, grads)
    loss, grad_norm = sums["loss"] / normaliser, optax.tree.norm(grads)
    clock = optim.reset_clock(cfg, state.schedule, state.step, total)
    lr = optim.learning_rate(cfg, clock, state.step)
    updates, opt_state = setup.tx.update(grads, state.opt_state, trained)
    updated = optax.apply_updates(trained, jax.tree.map(lambda u: lr * u, updates))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updated, opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), (updated, opt_state), (trained, state.opt_state)
    )
    params = lora.combine(updated, base)
    bad = 1 - finite.astype(jnp.int32)
    skipped, streak = state.skipped_steps + bad, (state.nonfinite_streak + 1) * bad
    metrics = {
      **{f"train/{name}": value / normaliser for name, value in sums.items()},
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "lr": lr,
      "train/skipped_steps": skipped,
      "nonfinite_streak": streak,
    }
    new_state = state.replace(
      step=state.step + 1 - bad,
      params=params,
      opt_state=opt_state,
      rng=jax.random.key_data(next_key),
      skipped_steps=skipped,
      nonfinite_streak=streak,
      schedule=clock,
    )
    return new_state, metrics

  batch_sharding = partitioning.batch_sharding(setup.mesh)
  return jax.jit(
    step,
    in_shardings=(setup.state_shardings, batch_sharding),
    out_shardings=(setup.state_shardings, partitioning.replicated(setup.mesh)),
    donate_argnums=(0,),
  )


def microbatches(x_B: jax.Array, accum: int, group: int = 1) -> jax.Array:
  """[B, ...] -> [A = accum, B / A, ...]: microbatch i holds the groups of `group` consecutive rows i, i + accum,
  i + 2 accum, ... (a preference pair's two rows stay together), so each takes rows from every data shard."""
  x_AxNxG = x_B.reshape(x_B.shape[0] // (accum * group), accum, group, *x_B.shape[1:]).swapaxes(0, 1)
  return x_AxNxG.reshape(accum, x_B.shape[0] // accum, *x_B.shape[1:])
