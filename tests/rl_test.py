import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import rl


def test_kl_estimators_are_unbiased_under_the_policy():
  # Exact expectations over 5 outcomes: sum_x p(x) * estimate(x) against KL(p || q) = sum_x p log(p / q).
  rng = np.random.default_rng(0)
  for _ in range(3):
    p, q = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5))
    kl = float(np.sum(p * np.log(p / q)))
    assert kl > 0.05  # distributions that differ
    for estimator in rl.KL_ESTIMATORS:
      estimate = np.asarray(rl.kl_estimate(jnp.log(p)[None], jnp.log(q)[None], estimator), np.float64)[0]
      assert float(np.sum(p * estimate)) == pytest.approx(kl, abs=1e-6)
    k1 = rl.kl_estimate(jnp.log(p)[None], jnp.log(q)[None], "k1")
    assert np.any(k1 < 0)  # k1 is unbiased per sample only on average
    assert np.all(rl.kl_estimate(jnp.log(p)[None], jnp.log(q)[None], "k3") >= 0)


def test_kl_estimators_are_zero_where_the_policy_is_the_reference_and_unknown_ones_are_errors():
  logp = jnp.log(jnp.array([[0.1, 0.5, 0.9]]))
  for estimator in rl.KL_ESTIMATORS:
    np.testing.assert_array_equal(rl.kl_estimate(logp, logp, estimator), np.zeros((1, 3)))
  with pytest.raises(ValueError, match="KL estimator"):
    rl.kl_estimate(logp, logp, "k2")


# One row, T = 5, the response at positions 1..3. Positions 0 and 4 (prompt, padding) hold junk rewards and
# values that must not enter: a value of 3 at position 4 would leak into A_3 as gamma * 3.
REWARDS = [[9.0, 0.0, 0.0, 1.0, 7.0]]
VALUES = [[5.0, 0.5, 0.25, 0.75, 3.0]]
MASK = [[0.0, 1.0, 1.0, 1.0, 0.0]]


def gae_reference(rewards, values, mask, gamma, lam):
  """The recursion as a Python loop over each row's masked positions, right to left."""
  advantages, returns = np.zeros_like(rewards), np.zeros_like(rewards)
  for b in range(len(rewards)):
    positions = [t for t in range(len(rewards[b])) if mask[b][t]]
    next_value, next_adv = 0.0, 0.0
    for t in reversed(positions):
      delta = rewards[b][t] + gamma * next_value - values[b][t]
      next_adv = delta + gamma * lam * next_adv
      next_value = values[b][t]
      advantages[b, t], returns[b, t] = next_adv, next_adv + values[b][t]
  return advantages, returns


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
  # Reward-to-go over positions 1..3 is 1 everywhere: A = 1 - V = [0.5, 0.75, 0.25], returns = 1.
  advantages, returns = rl.gae(jnp.array(REWARDS), jnp.array(VALUES), jnp.array(MASK), 1.0, 1.0)
  np.testing.assert_allclose(advantages, [[0.0, 0.5, 0.75, 0.25, 0.0]], atol=1e-7)
  np.testing.assert_allclose(returns, [[0.0, 1.0, 1.0, 1.0, 0.0]], atol=1e-7)


def test_gae_by_hand():
  # gamma = 0.9, lam = 0.8, gamma * lam = 0.72:
  # delta_3 = 1 + 0 - 0.75 = 0.25                   A_3 = 0.25
  # delta_2 = 0 + 0.9 * 0.75 - 0.25 = 0.425         A_2 = 0.425 + 0.72 * 0.25 = 0.605
  # delta_1 = 0 + 0.9 * 0.25 - 0.5 = -0.275         A_1 = -0.275 + 0.72 * 0.605 = 0.1606
  # returns = A + V = [0.6606, 0.855, 1.0]
  args = (jnp.array(REWARDS), jnp.array(VALUES), jnp.array(MASK))
  advantages, returns = rl.gae(*args, 0.9, 0.8)
  np.testing.assert_allclose(advantages, [[0.0, 0.1606, 0.605, 0.25, 0.0]], atol=1e-6)
  np.testing.assert_allclose(returns, [[0.0, 0.6606, 0.855, 1.0, 0.0]], atol=1e-6)
  jitted = jax.jit(rl.gae, static_argnums=(3, 4))(*args, 0.9, 0.8)
  np.testing.assert_array_equal(jitted[0], advantages)
  np.testing.assert_array_equal(jitted[1], returns)


def test_gae_matches_the_loop_on_rows_of_different_spans():
  rng = np.random.default_rng(1)
  rewards, values = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
  mask = np.zeros((4, 7))
  mask[0, 2:5], mask[1, 0:7], mask[2, 6] = 1, 1, 1  # a middle span, the whole row, the last position; row 3 empty
  advantages, returns = jax.jit(rl.gae)(rewards, values, mask, 0.95, 0.9)
  want_advantages, want_returns = gae_reference(rewards, values, mask, 0.95, 0.9)
  np.testing.assert_allclose(advantages, want_advantages, atol=1e-5)
  np.testing.assert_allclose(returns, want_returns, atol=1e-5)
  assert not np.any(np.asarray(advantages)[mask == 0]) and not np.any(np.asarray(returns)[mask == 0])
  assert advantages.dtype == returns.dtype == jnp.float32


def test_policy_loss_at_the_old_policy_is_minus_the_advantage():
  logp = jnp.array([[-1.0, -2.0, -0.5]])
  advantages = jnp.array([[1.5, -2.0, 0.0]])
  loss, clipped, approx_kl = rl.policy_loss(logp, logp, advantages, 0.2)
  np.testing.assert_array_equal(loss, -advantages)
  np.testing.assert_array_equal(clipped, np.zeros((1, 3)))
  np.testing.assert_array_equal(approx_kl, np.zeros((1, 3)))


def test_policy_loss_closed_forms_and_no_gradient_when_clipped():
  # c = 0.2. Token 0: A = 2, ratio 1.5 > 1.2: -2 * 1.2 = -2.4, clipped. Token 1: A = -1, ratio 0.5 < 0.8:
  # 1 * 0.8, clipped. Token 2: A = 3, ratio 1.1 inside: -3.3. Token 3: A = 2, ratio 0.5 below the range
  # but against the advantage: -2 * 0.5 = -1.0 beats -2 * 0.8, so unclipped (the pessimistic bound).
  ratio = jnp.array([[1.5, 0.5, 1.1, 0.5]])
  advantages = jnp.array([[2.0, -1.0, 3.0, 2.0]])
  old_logp = jnp.array([[-1.0, -2.0, -3.0, -0.5]])
  logp = old_logp + jnp.log(ratio)
  loss, clipped, approx_kl = rl.policy_loss(logp, old_logp, advantages, 0.2)
  np.testing.assert_allclose(loss, [[-2.4, 0.8, -3.3, -1.0]], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[1.0, 1.0, 0.0, 0.0]])
  np.testing.assert_allclose(approx_kl, 0.5 * np.log(np.asarray(ratio)) ** 2, rtol=1e-6)
  grad = jax.grad(lambda lp: jnp.sum(rl.policy_loss(lp, old_logp, advantages, 0.2)[0]))(logp)
  # d(-A * exp(logp - old)) / d logp = -A * ratio where unclipped; 0 where clipped.
  np.testing.assert_allclose(grad, [[0.0, 0.0, -3.3, -1.0]], rtol=1e-6)


def test_value_loss_closed_forms():
  # old 1, c = 0.2, so v_clipped = clip(values, 0.8, 1.2).
  # values 1.5, R 2: 0.5 * max(0.25, 0.64) = 0.32, clipped. values 1.5, R 0: 0.5 * max(2.25, 1.44) = 1.125.
  # values 1.1 (inside, v_clipped = values), R 2: 0.5 * 0.81 = 0.405, the squares tie: not clipped.
  values = jnp.array([[1.5, 1.5, 1.1]])
  loss, clipped = rl.value_loss(values, jnp.ones((1, 3)), jnp.array([[2.0, 0.0, 2.0]]), 0.2)
  np.testing.assert_allclose(loss, [[0.32, 1.125, 0.405]], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[1.0, 0.0, 0.0]])


def test_whiten_standardises_the_masked_entries_only():
  rng = np.random.default_rng(2)
  x = jnp.asarray(3.0 + 2.0 * rng.normal(size=(3, 8)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(3, 8)) < 0.6, jnp.float32)
  white = rl.whiten(x, mask)
  assert float(rl.masked_mean(white, mask)) == pytest.approx(0.0, abs=1e-6)
  assert float(rl.masked_var(white, mask)) == pytest.approx(1.0, abs=1e-5)
  assert not np.any(np.asarray(white)[np.asarray(mask) == 0])
  kept = rl.whiten(x, mask, shift_mean=False)
  assert float(rl.masked_mean(kept, mask)) == pytest.approx(float(rl.masked_mean(x, mask)), rel=1e-5)
  assert float(rl.masked_var(kept, mask)) == pytest.approx(1.0, abs=1e-5)
  assert not np.any(np.asarray(kept)[np.asarray(mask) == 0])


def test_masked_mean_and_var_by_hand():
  x, mask = jnp.array([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]]), jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
  # Masked entries 1, 2, 3, 6: mean 3, squared deviations 4, 1, 0, 9 sum to 14.
  assert float(rl.masked_mean(x, mask)) == 3.0
  assert float(rl.masked_var(x, mask, unbiased=False)) == pytest.approx(14 / 4)
  assert float(rl.masked_var(x, mask)) == pytest.approx(14 / 3)
  assert float(rl.masked_mean(x, jnp.zeros_like(mask))) == 0.0  # not NaN
  assert float(rl.masked_var(x, jnp.zeros_like(mask).at[0, 0].set(1.0))) == 0.0


def test_group_advantages_by_hand():
  rewards = jnp.array([1.0, 2.0, 3.0, 0.0, 0.0, 6.0, 5.0, 5.0, 5.0])
  # Group 0: mean 2, deviations [-1, 0, 1], population std sqrt(2 / 3). Group 1: mean 2, deviations
  # [-2, -2, 4], std sqrt(24 / 3) = sqrt(8). Group 2: all equal, 0s.
  advantages = rl.group_advantages(rewards, 3)
  std0, std1 = math.sqrt(2 / 3) + 1e-4, math.sqrt(8) + 1e-4
  want = [-1 / std0, 0.0, 1 / std0, -2 / std1, -2 / std1, 4 / std1, 0.0, 0.0, 0.0]
  np.testing.assert_allclose(advantages, want, rtol=1e-6)
  unscaled = rl.group_advantages(rewards, 3, scale=False)
  np.testing.assert_allclose(unscaled, [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0, 0.0, 0.0, 0.0], atol=1e-6)
  with pytest.raises(AssertionError):
    rl.group_advantages(rewards, 4)


LOSS = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 3.0]])
LOSS_MASK = jnp.array([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])


def test_aggregate_by_hand():
  # Masked losses: row 0 [2, 3], row 1 [5, 6, 7, 8], row 2 none, row 3 [1, 3].
  loss_sum, normaliser = rl.aggregate(LOSS, LOSS_MASK, "token_mean")
  assert (float(loss_sum), float(normaliser)) == (35.0, 8.0)
  loss_sum, normaliser = rl.aggregate(LOSS, LOSS_MASK, "sequence_mean")
  assert (float(loss_sum), float(normaliser)) == (2.5 + 6.5 + 2.0, 3.0)  # row 2 counts in neither
  with pytest.raises(ValueError, match="aggregation"):
    rl.aggregate(LOSS, LOSS_MASK, "sum")


@pytest.mark.parametrize("mode", rl.AGGREGATIONS)
def test_aggregate_adds_over_microbatches(mode):
  halves = [rl.aggregate(LOSS[i : i + 2], LOSS_MASK[i : i + 2], mode) for i in (0, 2)]
  whole_sum, whole_normaliser = rl.aggregate(LOSS, LOSS_MASK, mode)
  loss_sum, normaliser = sum(h[0] for h in halves), sum(h[1] for h in halves)
  assert float(normaliser) == float(whole_normaliser)
  assert float(loss_sum / normaliser) == pytest.approx(float(whole_sum / whole_normaliser), rel=1e-6)


def test_entropy():
  np.testing.assert_allclose(rl.entropy(jnp.full((2, 3, 7), 0.3)), np.full((2, 3), math.log(7)), rtol=1e-6)
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25, 0.0]]]))  # p = [1/2, 1/4, 1/4, 0]: 1.5 ln 2, no NaN at -inf
  np.testing.assert_allclose(rl.entropy(logits), [[1.5 * math.log(2)]], rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(rl.entropy(x)))(logits)
  assert np.all(np.isfinite(grad))


def test_explained_variance():
  rng = np.random.default_rng(3)
  returns = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  mask = jnp.array([[1.0, 1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
  assert float(rl.explained_variance(returns, returns, mask)) == pytest.approx(1.0)
  mean = rl.masked_mean(returns, mask)
  assert float(rl.explained_variance(jnp.full_like(returns, mean), returns, mask)) == pytest.approx(0.0, abs=1e-6)
  off = returns + 100.0 * (1 - mask)  # unmasked entries do not count
  assert float(rl.explained_variance(off, returns, mask)) == pytest.approx(1.0)
  assert float(rl.explained_variance(returns, jnp.ones_like(returns), mask)) == 0.0  # constant returns, not NaN
