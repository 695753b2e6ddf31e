import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import metrics as metrics_lib
from lm import optim, partitioning, train
from lm import state as state_lib
from lm import step as step_lib
from lm import tokenizer as tokenizer_lib
from lm.flops import flops_per_token
from lm.model import ModelConfig

from conftest import random_batch, tiny_config


def lr_at(cfg, steps):
  schedule = optim.make_schedule(cfg)
  return np.array([float(schedule(s)) for s in steps])


def test_cosine_warms_up_then_decays_to_the_final_fraction():
  cfg = tiny_config(**{"optim.lr": 1.0, "optim.warmup_steps": 10, "train.steps": 110, "optim.final_lr_fraction": 0.1})
  lr = lr_at(cfg, range(111))
  np.testing.assert_allclose(lr[:10], np.arange(1, 11) / 10, rtol=1e-6)
  assert lr[10] == pytest.approx(1.0)
  assert lr[60] == pytest.approx(0.55, rel=1e-4)  # halfway through the cosine
  assert lr[110] == pytest.approx(0.1, rel=1e-5)
  assert np.all(np.diff(lr[10:]) <= 1e-7)


@pytest.mark.parametrize("shape, midpoint", [("linear", 0.5), ("1-sqrt", 1 - np.sqrt(0.5))])
def test_wsd_is_flat_then_cools_down(shape, midpoint):
  cfg = tiny_config(
    **{
      "optim.schedule": "wsd",
      "optim.lr": 1.0,
      "optim.warmup_steps": 10,
      "train.steps": 100,
      "optim.cooldown_fraction": 0.2,
      "optim.cooldown_shape": shape,
      "optim.final_lr_fraction": 0.0,
    }
  )
  lr = lr_at(cfg, range(101))
  np.testing.assert_allclose(lr[10:81], 1.0)
  assert lr[90] == pytest.approx(midpoint, rel=1e-5)  # halfway through the cooldown
  assert lr[100] == pytest.approx(0.0, abs=1e-7)


def test_constant_schedule():
  cfg = tiny_config(**{"optim.schedule": "constant", "optim.lr": 0.5, "optim.warmup_steps": 4, "train.steps": 50})
  lr = lr_at(cfg, [0, 3, 4, 49])
  np.testing.assert_allclose(lr, [0.125, 0.5, 0.5, 0.5])


def test_weight_decay_skips_norms_and_embeddings_by_default():
  params = {"embed": 1, "layer_0": {"attn_norm": {"scale": 1}, "mlp": {"w_up": 1}}, "head": 1}
  mask = optim.decay_mask(params, tiny_config())
  assert mask == {"embed": False, "layer_0": {"attn_norm": {"scale": False}, "mlp": {"w_up": True}}, "head": True}
  mask = optim.decay_mask(params, tiny_config(**{"optim.decay_norms": True, "optim.decay_embeddings": True}))
  assert all(jax.tree.leaves(mask))


def run_steps(cfg, batches):
  mesh = partitioning.make_mesh(cfg, jax.devices()[:1])
  setup = state_lib.build(cfg, 64, mesh)
  step = step_lib.make_train_step(setup)
  with setup.context():
    state = setup.init_state()
    for batch in batches:
      state, metrics = step(state, batch)
  return jax.device_get(state.params), metrics


def test_gradient_accumulation_gives_the_full_batch_update():
  batches = [random_batch(8, 32, 64, seed=i, split=10) for i in range(3)]
  for b in batches:  # uneven masks: the accumulated mean must weight microbatches by tokens
    b["loss_mask"][:3, 20:] = 0.0
  full, full_metrics = run_steps(tiny_config(), batches)
  accum, accum_metrics = run_steps(tiny_config(**{"optim.grad_accum_steps": 4}), batches)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), full, accum)
  assert float(full_metrics["train/loss"]) == pytest.approx(float(accum_metrics["train/loss"]), rel=1e-5)
  assert float(full_metrics["grad_norm"]) == pytest.approx(float(accum_metrics["grad_norm"]), rel=1e-4)


def test_only_the_params_trainable_matches_change():
  batches = [random_batch(8, 32, 64, seed=i) for i in range(2)]
  setup = state_lib.build(tiny_config(), 64, partitioning.make_mesh(tiny_config(), jax.devices()[:1]))
  with setup.context():
    start = jax.device_get(setup.init_state().params)
  params, _ = run_steps(tiny_config(**{"optim.trainable": "layer_1/|head"}), batches)
  moved = jax.tree_util.tree_map_with_path(
    lambda path, a, b: (optim.param_path(path), not np.array_equal(a, b)), params, start
  )
  moved = dict(jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)))
  assert moved["head"] and moved["layer_1/mlp/w_up"] and moved["layer_1/attn_norm/scale"]
  assert not any(v for k, v in moved.items() if not (k.startswith("layer_1/") or k == "head")), moved
  all_moved, _ = run_steps(tiny_config(), batches)
  assert not np.array_equal(all_moved["embed"], start["embed"])


def test_frozen_params_keep_no_adam_moments():
  params = {"embed": np.zeros((16, 8), np.float32), "head": np.zeros((8, 16), np.float32)}
  sizes = {}
  for trainable in ("", "head"):
    state = optim.make_optimizer(tiny_config(**{"optim.trainable": trainable})).init(params)
    sizes[trainable] = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert sizes[""] == 2 * (16 * 8 + 8 * 16)  # mu and nu for both
  assert sizes["head"] == 2 * 8 * 16  # for the head only


def test_clipping_bounds_the_gradient_adam_sees():
  batch = random_batch(8, 32, 64)
  _, m = run_steps(tiny_config(**{"optim.clip_norm": 1e-3, "optim.warmup_steps": 0}), [batch])
  assert float(m["grad_norm"]) > 1e-3  # reported before clipping
  assert float(m["lr"]) == pytest.approx(3e-3)
  # Adam's first update is about sign(g) at any scale; the clip shows in its moments: mu = (1-b1) g, nu = (1-b2) g^2.
  clip, rng = 1e-3, np.random.default_rng(0)
  params = {"embed": rng.standard_normal((16, 8)), "layer_0": {"mlp": {"w_up": rng.standard_normal((8, 32))}}}
  params = jax.tree.map(lambda p: p.astype(np.float32), params)
  huge = jax.tree.map(lambda p: 1e4 * rng.standard_normal(p.shape).astype(np.float32), params)
  norm = float(optax.tree.norm(huge))

  def first_step(clip_norm, grads):
    tx = optim.make_optimizer(tiny_config(**{"optim.clip_norm": clip_norm}))
    updates, state = tx.update(grads, tx.init(params), params)
    return updates, optax.tree.get(state, "mu"), optax.tree.get(state, "nu")

  _, mu, nu = first_step(clip, huge)
  assert norm > 1e4 and float(optax.tree.norm(mu)) == pytest.approx(0.1 * clip, rel=1e-5)  # b1 = 0.9
  assert sum(float(v.sum()) for v in jax.tree.leaves(nu)) == pytest.approx(0.05 * clip**2, rel=1e-5)  # b2 = 0.95
  scaled = jax.tree.map(lambda g: g * (clip / norm), huge)  # the same gradient at norm `clip`, unclipped
  for got, want in zip(first_step(clip, huge), first_step(0.0, scaled), strict=True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12), got, want)


def model_cfg(cfg):
  return ModelConfig.from_config(cfg, 64)


@pytest.mark.parametrize("budget", ["train.max_tokens", "train.max_flops"])
def test_a_budget_is_the_run_length_and_the_schedule_length(budget):
  cfg = tiny_config(**{"train.steps": 1000})
  per_step = 8 * 32 * (1 if budget == "train.max_tokens" else flops_per_token(model_cfg(cfg), 32, "6N+attn"))
  config_lib.set_key(cfg, budget, type(cfg.train[budget.split(".")[1]])(40.5 * per_step))
  assert optim.run_steps(cfg, model_cfg(cfg)) == 41  # the step that crosses the budget is the last
  config_lib.set_key(cfg, "train.steps", 30)
  assert optim.run_steps(cfg, model_cfg(cfg)) == 30


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_budget_capped_run_reaches_the_final_lr_at_its_last_step(tmp_path, text_corpus, schedule):
  overrides = {"optim.schedule": schedule, "optim.cooldown_fraction": 0.5, "train.steps": 100}
  cfg = tiny_config(**overrides, **{"data.source": text_corpus, "train.max_tokens": 6 * 8 * 32})
  final_lr = cfg.optim.lr * cfg.optim.final_lr_fraction
  assert train.train(cfg, str(tmp_path / "w"), progress=False)["step"] == 6
  state = restore(cfg, tmp_path / "w")
  assert int(state.step) == 6 and float(optim.learning_rate(cfg, state.schedule, 6)) == pytest.approx(final_lr)
  logged = [r["lr"] for r in metrics_lib.read_metrics(str(tmp_path / "w"))]  # step n logs the lr of update n - 1
  np.testing.assert_allclose(logged, lr_at(tiny_config(**{**overrides, "train.steps": 6}), range(6)), rtol=1e-6)
  assert logged[-1] < cfg.optim.lr and np.all(np.diff(logged[1:]) <= 0)


def restore(cfg, workdir):
  setup = state_lib.build(cfg, tokenizer_lib.load_tokenizer(workdir).vocab_size, partitioning.make_mesh(cfg))
  with setup.context():
    return checkpoint_lib.restore_latest(str(workdir), setup.abstract_state).state


def resumed_lrs(cfg, lengths: list[tuple[int, int]]) -> np.ndarray:
  """The lr of updates 0..end of a run that starts with length lengths[0][1] and, at each later (step, length),
  is resumed with that length."""
  (_, total), *resumes = lengths
  clock, lrs, step = optim.fresh_clock(cfg, total), [], 0
  for at, new_total in [*resumes, (None, None)]:
    while step < (at if at is not None else total + 1):
      lrs.append(float(optim.learning_rate(cfg, clock, step)))
      step += 1
    if at is not None:
      clock, total = optim.reset_clock(cfg, clock, at, new_total), new_total
  return np.array(lrs)


def continuity(lrs, at):
  """|lr change| across the resume at `at`, and the largest change between other consecutive updates."""
  steps = np.abs(np.diff(lrs))
  return steps[at - 1], np.max(np.delete(steps, at - 1))


SCHEDULES = {
  "cosine": {"optim.schedule": "cosine"},
  "wsd": {"optim.schedule": "wsd", "optim.cooldown_fraction": 0.4},
  "wsd 1-sqrt": {"optim.schedule": "wsd", "optim.cooldown_fraction": 0.4, "optim.cooldown_shape": "1-sqrt"},
}


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("at, length", [(70, 150), (90, 130), (70, 80), (70, 75)])
def test_a_resume_with_another_length_continues_the_lr(name, at, length):
  cfg = tiny_config(**{**SCHEDULES[name], "optim.lr": 1.0, "optim.warmup_steps": 10})
  lrs = resumed_lrs(cfg, [(0, 100), (at, length)])
  assert len(lrs) == length + 1
  np.testing.assert_array_equal(lrs[: at + 1], make_lrs(cfg, 100)[: at + 1])
  jump, ordinary = continuity(lrs, at)
  assert jump <= ordinary + 1e-6
  assert lrs[length] == pytest.approx(0.1, rel=1e-5) and np.all(np.diff(lrs[10:]) <= 1e-7)


def make_lrs(cfg, total):
  return np.array([float(optim.make_schedule(cfg, total)(s)) for s in range(total + 1)])


def test_wsd_resumed_in_its_stable_phase_is_the_run_of_the_new_length():
  cfg = tiny_config(**{**SCHEDULES["wsd"], "optim.lr": 1.0, "optim.warmup_steps": 10})
  for at, longer in ((5, 150), (40, 150), (40, 70)):  # in warmup; at peak, longer and shorter
    np.testing.assert_allclose(resumed_lrs(cfg, [(0, 100), (at, longer)]), make_lrs(cfg, longer), atol=1e-7)


def test_a_second_resume_stretches_the_stretched_schedule_and_an_ended_run_stays_at_the_final_lr():
  cfg = tiny_config(**{"optim.lr": 1.0, "optim.warmup_steps": 10})
  twice = resumed_lrs(cfg, [(0, 100), (50, 150), (120, 200)])
  once = resumed_lrs(cfg, [(0, 100), (50, 150)])
  np.testing.assert_array_equal(twice[:121], once[:121])
  for at in (50, 120):
    jump, ordinary = continuity(twice, at)
    assert jump <= ordinary + 1e-6
  assert twice[200] == pytest.approx(0.1, rel=1e-5)
  ended = resumed_lrs(cfg, [(0, 100), (100, 130)])
  np.testing.assert_allclose(ended[100:], 0.1, rtol=1e-5)
  unchanged = resumed_lrs(cfg, [(0, 100), (50, 100)])  # a resume of the same length changes nothing
  np.testing.assert_array_equal(unchanged, resumed_lrs(cfg, [(0, 100)]))


def train_states(cfg, batches):
  """The state after the batches, on host, and each step's loss."""
  mesh = partitioning.make_mesh(cfg, jax.devices()[:1])
  setup = state_lib.build(cfg, 64, mesh)
  step = step_lib.make_train_step(setup)
  losses = []
  with setup.context():
    state = setup.init_state()
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["train/loss"]))
  return jax.device_get(state), np.array(losses)


def test_bf16_params_train_f32_master_weights_and_moments_close_to_an_f32_run():
  batches = [random_batch(8, 32, 64, seed=i) for i in range(4)]
  full, full_losses = train_states(tiny_config(), batches)
  bf16_cfg = tiny_config(**{"model.param_dtype": "bfloat16", "optim.grad_accum_steps": 2})
  bf16, bf16_losses = train_states(bf16_cfg, batches)
  assert {x.dtype for x in jax.tree.leaves((bf16.params, bf16.opt_state))} == {np.dtype(np.float32), np.dtype(np.int32)}
  adam = [s for s in jax.tree.leaves(bf16.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
  assert len(adam) == 1 and all(x.dtype == np.float32 for x in jax.tree.leaves((adam[0].mu, adam[0].nu)))
  np.testing.assert_allclose(bf16_losses, full_losses, rtol=2e-2)


def test_bf16_params_keep_updates_smaller_than_a_bf16_step():
  tiny_lr = {"model.param_dtype": "bfloat16", "optim.lr": 1e-5, "optim.warmup_steps": 0, "optim.weight_decay": 0.0}
  cfg = tiny_config(**tiny_lr)
  before, _ = train_states(cfg, [])
  after, _ = train_states(cfg, [random_batch(8, 32, 64)])
  w_before, w_after = before.params["layer_0"]["mlp"]["w_up"], after.params["layer_0"]["mlp"]["w_up"]
  moved = np.abs(w_after - w_before)
  assert np.all(moved > 0.5e-5)  # Adam's first step moves every weight by ~lr
  same_in_bf16 = jnp.asarray(w_after, jnp.bfloat16) == jnp.asarray(w_before, jnp.bfloat16)
  assert float(jnp.mean(same_in_bf16)) > 0.9  # weights stored in bf16 would mostly not have moved
