"""Learning-rate schedules and the AdamW chain (clipping, decoupled, masked weight decay)."""

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine, WSD or constant, ending at lr * final_lr_fraction."""
  o, steps = cfg.optim, cfg.train.steps
  peak, final = o.lr, o.lr * o.final_lr_fraction
  warmup = min(o.warmup_steps, steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1)) if warmup else peak
    if o.schedule == "constant":
      lr = peak
    elif o.schedule == "cosine":
      frac = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
      lr = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:  # wsd: warmup, stable at peak, then decay over the last cooldown_fraction of steps
      cooldown = max(int(round(o.cooldown_fraction * steps)), 1)
      frac = jnp.clip((step - (steps - cooldown)) / cooldown, 0.0, 1.0)
      shape = frac if o.cooldown_shape == "linear" else jnp.sqrt(frac)  # 1-sqrt: lr ~ 1 - sqrt(frac)
      lr = peak - (peak - final) * shape
    return jnp.where(step < warmup, warm, lr)

  return schedule


def decay_mask(params, cfg: ml_collections.ConfigDict):
  """True for the parameters weight decay applies to: matrices, and optionally norms/embeddings."""

  def keep(path, _):
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]  # skips box attributes
    if names[-1] == "scale":
      return cfg.optim.decay_norms
    if names[-1] == "embed":
      return cfg.optim.decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = cfg.optim
  adamw = optax.adamw(
    make_schedule(cfg),
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    mask=lambda params: decay_mask(params, cfg),
  )
  if o.clip_norm:
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
  return adamw
