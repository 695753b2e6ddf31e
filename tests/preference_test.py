import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import preference
from lm.model import ModelConfig, Transformer, last_token, trunk_params

V = 97
LN2 = math.log(2.0)

# Three pairs of hand-built sequence log-probs. Log-ratios pi - ref: chosen [1, 0, 1], rejected [-1, 1, -1],
# so h = chosen - rejected = [2, -1, 2]; with beta = 0.25, z = beta * h = [0.5, -0.25, 0.5].
PI_CHOSEN = [-10.0, -5.0, -3.0]
PI_REJECTED = [-12.0, -4.0, -7.0]
REF_CHOSEN = [-11.0, -5.0, -4.0]
REF_REJECTED = [-11.0, -5.0, -6.0]
BETA = 0.25


def dpo(loss_type, label_smoothing=0.0):
  """(loss, metrics, gradients with respect to the four log-prob arrays) of the hand-built pairs."""
  args = [jnp.asarray(x) for x in (PI_CHOSEN, PI_REJECTED, REF_CHOSEN, REF_REJECTED)]

  def loss(*logps):
    return preference.dpo_loss(*logps, beta=BETA, loss_type=loss_type, label_smoothing=label_smoothing)

  (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
  return float(value), metrics, grads


def assert_grads(grads, d_pi_chosen):
  """h = pi_c - ref_c - pi_r + ref_r: the loss's gradient is +g for pi_c and ref_r, -g for pi_r and ref_c."""
  g = np.asarray(d_pi_chosen)
  for grad, sign in zip(grads, (1, -1, -1, 1), strict=True):
    np.testing.assert_allclose(grad, sign * g, rtol=1e-5, atol=1e-7)


def test_dpo_is_ln2_with_accuracy_one_half_when_the_policy_is_the_reference():
  logps = jax.random.normal(jax.random.key(0), (2, 8)) * 10
  for beta in (0.1, 1.0):
    loss, metrics = preference.dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=beta)
    assert float(loss) == pytest.approx(LN2, rel=1e-6)
    assert float(metrics["rewards/accuracy"]) == 0.5  # every pair a tie
    assert float(metrics["rewards/chosen"]) == float(metrics["rewards/margin"]) == 0.0
    assert float(metrics["logps/chosen"]) == pytest.approx(float(jnp.mean(logps[0])))


def test_dpo_sigmoid_closed_form():
  # loss_p = -log sigmoid(z_p) = log(1 + exp(-z_p)): log(1 + e^-0.5) = 0.474077, log(1 + e^0.25) = 0.825939;
  # mean = (2 * 0.474077 + 0.825939) / 3 = 0.591364.
  # d loss / d pi_c_p = -(beta / P) sigmoid(-z_p): -(0.25 / 3) * [0.377541, 0.562177, 0.377541].
  loss, metrics, grads = dpo("sigmoid")
  assert loss == pytest.approx(0.5913645, rel=1e-6)
  assert_grads(grads, [-0.0314617, -0.0468480, -0.0314617])
  # Rewards beta * (pi - ref): chosen [0.25, 0, 0.25], rejected [-0.25, 0.25, -0.25]; pair 2 loses.
  assert float(metrics["rewards/chosen"]) == pytest.approx(0.5 / 3)
  assert float(metrics["rewards/rejected"]) == pytest.approx(-0.25 / 3)
  assert float(metrics["rewards/accuracy"]) == pytest.approx(2 / 3)
  assert float(metrics["rewards/margin"]) == pytest.approx(0.75 / 3)  # beta * mean(h) = 0.25 * 3 / 3
  assert float(metrics["logps/chosen"]) == pytest.approx(-6.0)
  assert float(metrics["logps/rejected"]) == pytest.approx(-23.0 / 3)


def test_dpo_label_smoothing_closed_form():
  # -(1 - eps) log sig(z) - eps log sig(-z) = -log sig(z) + eps z, as log sig(z) - log sig(-z) = z:
  # the loss grows by eps * mean(z) = 0.1 * 0.75 / 3 = 0.025, and its gradient by eps * beta / P.
  loss, _, grads = dpo("sigmoid", label_smoothing=0.1)
  assert loss == pytest.approx(0.5913645 + 0.025, rel=1e-6)
  assert_grads(grads, [-0.0314617 + 0.1 * 0.25 / 3, -0.0468480 + 0.1 * 0.25 / 3, -0.0314617 + 0.1 * 0.25 / 3])


def test_ipo_closed_form():
  # (h - 1 / (2 beta))^2 = (h - 2)^2 = [0, 9, 0]: mean 3; d / d pi_c = (2 / P) (h - 2) = [0, -2, 0].
  loss, _, grads = dpo("ipo")
  assert loss == pytest.approx(3.0)
  assert_grads(grads, [0.0, -2.0, 0.0])


def test_hinge_closed_form():
  # relu(1 - z) = [0.5, 1.25, 0.5]: mean 0.75; every pair is inside the hinge: d / d pi_c = -beta / P.
  loss, _, grads = dpo("hinge")
  assert loss == pytest.approx(0.75)
  assert_grads(grads, [-0.25 / 3] * 3)


def test_unknown_loss_types_and_smoothing_outside_sigmoid_are_errors():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="loss_type"):
    preference.dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
  with pytest.raises(ValueError, match="label_smoothing"):
    preference.dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1)


def test_bradley_terry_closed_form_with_margin_and_centering():
  r_chosen, r_rejected, margin = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), jnp.array([0.5, 0.0])
  loss, metrics = preference.bradley_terry_loss(r_chosen, r_rejected, margin, center_coef=0.1)
  # -log sig(1 - 0 - 0.5) = 0.474077, -log sig(0 - 1 - 0) = log(1 + e) = 1.313262: mean 0.893669;
  # centering 0.1 * mean((1 + 0)^2, (0 + 1)^2) = 0.1.
  assert float(loss) == pytest.approx(0.893669 + 0.1, rel=1e-6)
  no_margin, _ = preference.bradley_terry_loss(r_chosen, r_rejected, 0.0, center_coef=0.1)
  assert float(no_margin) == pytest.approx((0.313262 + 1.313262) / 2 + 0.1, rel=1e-6)  # -log sig(1) = 0.313262
  assert float(metrics["rewards/accuracy"]) == 0.5
  assert float(metrics["rewards/margin"]) == 0.0 and float(metrics["rewards/mean"]) == 0.5
  at_zero, metrics = preference.bradley_terry_loss(jnp.zeros(4), jnp.zeros(4), 0.0, center_coef=1.0)
  assert float(at_zero) == pytest.approx(LN2) and float(metrics["rewards/accuracy"]) == 0.5


def test_split_pairs_takes_even_rows_as_chosen():
  chosen, rejected = preference.split_pairs(jnp.arange(12).reshape(6, 2))
  np.testing.assert_array_equal(chosen[:, 0], [0, 4, 8])
  np.testing.assert_array_equal(rejected[:, 0], [2, 6, 10])


def test_padding_pairs_weigh_nothing():
  segment_ids = np.zeros((6, 4), np.int32)
  segment_ids[:4, :3] = 1  # pairs 0 and 1 real; pair 2 is two padding rows (an eval set's last batch)
  weights = preference.pair_weights(jnp.asarray(segment_ids))
  np.testing.assert_array_equal(weights, [1.0, 1.0, 0.0])
  args = [jnp.asarray(x) for x in (PI_CHOSEN, PI_REJECTED, REF_CHOSEN, REF_REJECTED)]
  for loss_type in preference.LOSS_TYPES:

    def loss(*logps, weights=weights, loss_type=loss_type):
      return preference.dpo_loss(*logps, beta=BETA, loss_type=loss_type, weights_P=weights)

    (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    (two, two_metrics), two_grads = jax.value_and_grad(
      lambda *logps, loss_type=loss_type: preference.dpo_loss(*logps, beta=BETA, loss_type=loss_type),
      argnums=(0, 1, 2, 3),
      has_aux=True,
    )(*[x[:2] for x in args])
    assert float(value) == pytest.approx(float(two), rel=1e-6)  # the mean of the two real pairs
    assert float(metrics["rewards/accuracy"]) == float(two_metrics["rewards/accuracy"]) == 0.5
    for grad, two_grad in zip(grads, two_grads, strict=True):
      np.testing.assert_allclose(grad, [*two_grad, 0.0], rtol=1e-6)
    nothing, grads = jax.value_and_grad(lambda *a: loss(*a, weights=jnp.zeros(3))[0], argnums=(0, 1, 2, 3))(*args)
    assert float(nothing) == 0.0 and all(not np.any(g) for g in grads)  # no NaN from 0 / 0
  bt, _ = preference.bradley_terry_loss(jnp.array([1.0, 0.0, 9.0]), jnp.zeros(3), 0.0, 0.1, weights)
  assert float(bt) == pytest.approx((0.313262 + LN2) / 2 + 0.1 * 0.5, rel=1e-6)


def test_sequence_logps_sums_masked_target_log_probs():
  logits = jnp.zeros((2, 3, 3)).at[1, :, 2].set(math.log(2.0))  # row 1: p = [1/4, 1/4, 1/2]
  targets = jnp.array([[0, 1, 2], [2, 2, 0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  logps = preference.sequence_logps(logits, targets, mask)
  np.testing.assert_allclose(logps, [2 * math.log(1 / 3), 2 * math.log(1 / 2) + math.log(1 / 4)], rtol=1e-6)


@pytest.mark.parametrize("length", [24, 21])  # 4 chunks of 6 positions; 3 chunks of 7
def test_chunked_sequence_logps_equal_the_full_logits_and_their_gradients(length):
  keys = jax.random.split(jax.random.key(4), 5)
  x = jax.random.normal(keys[0], (4, length, 16))
  head = jax.random.normal(keys[1], (16, V)) * 0.5
  targets = jax.random.randint(keys[2], (4, length), 0, V)
  mask = (jax.random.uniform(keys[3], (4, length)) > 0.3).astype(jnp.float32)
  cotangent = jax.random.normal(keys[4], (4,))  # a different weight per row: each row's gradient is its own

  def full(x, head):
    return jnp.vdot(cotangent, preference.sequence_logps(jnp.einsum("btd,dv->btv", x, head), targets, mask))

  def chunked(x, head):
    return jnp.vdot(cotangent, preference.hidden_sequence_logps(x, head, targets, mask))

  np.testing.assert_allclose(
    preference.hidden_sequence_logps(x, head, targets, mask),
    preference.sequence_logps(jnp.einsum("btd,dv->btv", x, head), targets, mask),
    rtol=1e-5,
  )
  grads, grads_full = jax.grad(chunked, (0, 1))(x, head), jax.grad(full, (0, 1))(x, head)
  for grad, grad_full in zip(grads, grads_full, strict=True):
    np.testing.assert_allclose(grad, grad_full, atol=1e-5)


def reward_model(**kw):
  cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, head="scalar", **kw)
  model = Transformer(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
  return model, params


def pair_batch(lengths, t=16, seed=0):
  """Rows of one right-padded sequence each, of the given lengths (chosen, rejected, chosen, ...)."""
  rng = np.random.default_rng(seed)
  real = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
  return {
    "inputs": rng.integers(0, V, (len(lengths), t)).astype(np.int32),
    "segment_ids": real.astype(np.int32),
    "positions": np.where(real, np.arange(t)[None, :], 0).astype(np.int32),
  }


def rewards(model, params, batch):
  scores_BxT = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
  return last_token(scores_BxT, jnp.asarray(batch["segment_ids"]))


def test_the_scalar_head_reads_the_last_real_token():
  model, params = reward_model()
  params["score"] = jax.random.normal(jax.random.key(1), params["score"].shape)
  lengths = [5, 16, 9, 1]
  batch = pair_batch(lengths)
  r = rewards(model, params, batch)
  scores = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
  np.testing.assert_array_equal(r, scores[np.arange(4), np.asarray(lengths) - 1])
  padded = dict(batch, inputs=batch["inputs"].copy())
  padded["inputs"][0, 5:] = (padded["inputs"][0, 5:] + 1) % V  # padding only
  padded["inputs"][2, 12] = (padded["inputs"][2, 12] + 1) % V
  np.testing.assert_array_equal(rewards(model, params, padded), r)
  last = dict(batch, inputs=batch["inputs"].copy())
  last["inputs"][[0, 2], [4, 8]] = (last["inputs"][[0, 2], [4, 8]] + 1) % V  # the last real tokens of rows 0, 2
  changed = rewards(model, params, last)
  assert changed[0] != r[0] and changed[2] != r[2]
  np.testing.assert_array_equal(changed[np.array([1, 3])], r[np.array([1, 3])])


def directional_derivatives(value, grads, params, direction, eps=1e-2):
  """(grads . direction, central difference of `value` along the unit-norm `direction`)."""
  norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(direction)))
  unit = jax.tree.map(lambda x: x / norm, direction)
  plus = value(jax.tree.map(lambda p, d: p + eps * d, params, unit))
  minus = value(jax.tree.map(lambda p, d: p - eps * d, params, unit))
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(unit), strict=True))
  return float(analytic), float((plus - minus) / (2 * eps))


def test_a_zero_head_gives_ln2_and_the_gradient_matches_finite_differences():
  model, params = reward_model()
  batch = pair_batch([5, 16, 9, 3, 12, 7], seed=1)

  def loss(params, margin=0.0, center_coef=0.0):
    r_chosen, r_rejected = preference.split_pairs(rewards(model, params, batch))
    return preference.bradley_terry_loss(r_chosen, r_rejected, margin, center_coef)[0]

  assert float(loss(params)) == pytest.approx(LN2, rel=1e-6)  # the head starts at zero
  assert float(loss(params, center_coef=0.5)) == pytest.approx(LN2, rel=1e-6)
  params["score"] = jax.random.normal(jax.random.key(2), params["score"].shape)
  value = jax.jit(lambda p: loss(p, jnp.array([0.0, 0.3, 0.1]), 0.1))
  grads = jax.jit(jax.grad(value))(params)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  everywhere = jax.tree.unflatten(tree, [jax.random.normal(key, x.shape) for key, x in zip(keys, leaves, strict=True)])
  trunk = dict(everywhere, score=jnp.zeros_like(params["score"]))  # through the custom attention and MLP VJPs
  for direction in (everywhere, trunk):
    analytic, numeric = directional_derivatives(value, grads, params, direction)
    assert abs(analytic) > 1e-3  # a direction the loss moves along
    assert analytic == pytest.approx(numeric, rel=2e-3)  # measured: within 2e-4


def test_a_reward_model_starts_from_a_language_models_trunk():
  lm_cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  lm = Transformer(lm_cfg)
  lm_params = nn.unbox(lm.init(jax.random.key(5), jnp.zeros((1, 16), jnp.int32))["params"])
  model, params = reward_model()
  start = trunk_params(params, lm_params)
  assert "head" not in start and "score" not in start  # the LM head is dropped, the zero score head kept
  params = {**params, **start}
  params["score"] = jax.random.normal(jax.random.key(6), params["score"].shape)
  batch = pair_batch([16, 16])
  hidden, _ = lm.apply({"params": lm_params}, batch["inputs"], return_hidden=True)
  np.testing.assert_allclose(
    model.apply({"params": params}, batch["inputs"]), hidden @ params["score"], rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="lack layer_1"):
    trunk_params(params, {k: v for k, v in lm_params.items() if k != "layer_1"})
  small = ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  small_params = nn.unbox(Transformer(small).init(jax.random.key(5), jnp.zeros((1, 16), jnp.int32))["params"])
  with pytest.raises(ValueError, match="shapes differ"):
    trunk_params(params, small_params)
