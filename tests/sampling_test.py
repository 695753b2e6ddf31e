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


def tiny_model(**kw):
  from lm.model import ModelConfig, Transformer

  cfg = ModelConfig(vocab_size=263, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, **kw)
  model = Transformer(cfg)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


@pytest.mark.parametrize("scan", [False, True])
def test_cached_logits_match_the_full_forward_pass(scan):
  from lm.model import init_cache

  model, params = tiny_model(scan_layers=scan)
  tokens = jnp.asarray(np.random.default_rng(0).integers(7, 263, (2, 20)), jnp.int32)
  full = model.apply({"params": params}, tokens)
  cache = init_cache(model.cfg, 2, 24)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  logits, cache = model.apply({"params": params}, tokens[:, :6], None, positions, cache=cache)
  np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
  for t in range(6, 20):
    logits, cache = model.apply({"params": params}, tokens[:, t : t + 1], None, jnp.full((2, 1), t), cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def make_sampler(model):
  from lm.tokenizer import EOS_ID, ByteTokenizer

  return sampling.Sampler.for_model(model, 64, ByteTokenizer(), EOS_ID)


def test_greedy_batch_of_different_lengths_equals_the_uncached_argmax_chain():
  model, params = tiny_model()
  prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30]]
  greedy = sampling.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
  out = make_sampler(model).generate(params, prompts, [greedy] * 3)
  for prompt, gen in zip(prompts, out, strict=True):
    seq = list(prompt)
    for _ in range(12):
      seq.append(int(jnp.argmax(model.apply({"params": params}, jnp.asarray([seq]))[0, -1])))
    assert gen.tokens == seq[len(prompt) :]
    full = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([seq]))[0], axis=-1)
    expected = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(gen.tokens)]
    np.testing.assert_allclose(gen.logprobs, expected, atol=1e-4)


def test_seed_determinism_and_stops():
  model, params = tiny_model()
  sampler = make_sampler(model)
  request = sampling.SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
  a = sampler.generate(params, [[40, 41]], [request])[0]
  b = sampler.generate(params, [[40, 41], [50]], [request, request])[0]
  assert a.tokens == b.tokens and len(a.tokens) == 20
  c = sampler.generate(params, [[40, 41]], [sampling.SamplingParams(**{**request.__dict__, "seed": 8})])[0]
  assert c.tokens != a.tokens
  stop = a.tokens[5]
  cut = sampler.generate(params, [[40, 41]], [sampling.SamplingParams(**{**request.__dict__, "stop_tokens": (stop,)})])
  assert cut[0].tokens == a.tokens[: a.tokens.index(stop)] and cut[0].finish_reason == "stop"
  text = a.text
  if len(text) > 4:
    by_string = sampler.generate(
      params, [[40, 41]], [sampling.SamplingParams(**{**request.__dict__, "stop_strings": (text[3:5],)})]
    )[0]
    assert by_string.text == text[: text.find(text[3:5])]


def test_prompt_too_long_and_empty_prompt():
  model, params = tiny_model()
  sampler = make_sampler(model)
  with pytest.raises(UserError, match="exceeds the context"):
    sampler.generate(params, [list(range(7, 60))], [sampling.SamplingParams(max_new_tokens=20)])
  with pytest.raises(UserError, match="empty prompt"):
    sampler.generate(params, [[]], [sampling.SamplingParams(max_new_tokens=2)])
