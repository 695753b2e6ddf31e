import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sampling
from lm.errors import UserError


def support(filtered_BxV):
  return np.isfinite(np.asarray(filtered_BxV))


def controls(b, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
  return (
    jnp.full((b,), temperature, jnp.float32),
    jnp.full((b,), top_k, jnp.int32),
    jnp.full((b,), top_p, jnp.float32),
    jnp.full((b,), min_p, jnp.float32),
  )


def test_top_k_keeps_exactly_k_tokens():
  logits = jax.random.normal(jax.random.key(0), (4, 50))
  for k in (1, 5, 17, 50):
    kept = support(sampling.filter_logits(logits, *controls(4, top_k=k)))
    assert (kept.sum(-1) == k).all()
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    assert all(kept[i, top[i]].all() for i in range(4))


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  logits = jnp.log(jnp.asarray(probs))[None]
  for p, n in [(0.3, 1), (0.4, 1), (0.41, 2), (0.65, 2), (0.66, 3), (0.9, 4), (0.95, 5), (1.0, 6)]:
    kept = support(sampling.filter_logits(logits, *controls(1, top_p=p)))[0]
    assert kept.sum() == n, (p, kept)
    assert kept[:n].all()


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
  probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
  kept = support(sampling.filter_logits(jnp.log(jnp.asarray(probs))[None], *controls(1, min_p=0.15)))[0]
  assert kept.tolist() == [True, True, True, False, False]  # 0.1 >= 0.075, 0.06 < 0.075


def test_per_row_controls():
  logits = jnp.tile(jax.random.normal(jax.random.key(1), (1, 30)), (3, 1))
  filtered = sampling.filter_logits(
    logits, jnp.ones(3), jnp.array([2, 0, 10], jnp.int32), jnp.array([1.0, 1.0, 1.0]), jnp.zeros(3)
  )
  assert support(filtered).sum(-1).tolist() == [2, 30, 10]


def test_temperature_sampling_matches_softmax_frequencies():
  logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
  t = 0.7
  n = 40_000
  filtered = sampling.filter_logits(jnp.tile(logits, (n, 1)), *controls(n, temperature=t))
  keys = jax.random.split(jax.random.key(42), n)
  draws = np.asarray(sampling.choose(keys, jnp.tile(logits, (n, 1)), jnp.full((n,), t), filtered))
  observed = np.bincount(draws, minlength=5)
  expected = np.asarray(jax.nn.softmax(logits / t)) * n
  chi2 = float(((observed - expected) ** 2 / expected).sum())
  assert chi2 < 18.5  # chi-square, 4 degrees of freedom, p = 0.001


def test_zero_temperature_is_greedy():
  logits = jax.random.normal(jax.random.key(3), (8, 40))
  filtered = sampling.filter_logits(logits, *controls(8, temperature=0.0))
  keys = jax.random.split(jax.random.key(0), 8)
  chosen = sampling.choose(keys, logits, jnp.zeros(8), filtered)
  np.testing.assert_array_equal(chosen, np.argmax(logits, -1))


def test_penalties():
  logits = jnp.array([[2.0, -2.0, 1.0]])
  counts = jnp.array([[1.0, 1.0, 0.0]])
  out = sampling.penalize(logits, counts, jnp.array([2.0]), jnp.array([0.0]))
  np.testing.assert_allclose(out, [[1.0, -4.0, 1.0]])
  out = sampling.penalize(logits, counts * 3, jnp.array([1.0]), jnp.array([0.5]))
  np.testing.assert_allclose(out, [[0.5, -3.5, 1.0]])


@pytest.mark.parametrize(
  "params, message",
  [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=600), "context"),
  ],
)
def test_bad_controls(params, message):
  with pytest.raises(UserError, match=message):
    sampling.SamplingParams(**params).validate(context=512)
