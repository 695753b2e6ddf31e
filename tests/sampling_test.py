import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sample_cli, sampling
from lm.errors import UserError

from conftest import REPO


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


def full_forward(model):
  """Jitted logits of whole sequences: each new length compiles once."""
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_logits_match_the_full_forward_pass(scan):
  from lm.model import init_cache

  model, params = tiny_model(scan_layers=scan)
  tokens = np.random.default_rng(0).integers(7, 263, (2, 20)).astype(np.int32)
  full = full_forward(model)(params, tokens)
  # Row 1 is the same as row 0 but left-padded by 3 slots (negative positions) and 3 tokens shorter.
  prompt = np.stack([tokens[0, :6], np.concatenate([np.full(3, 99), tokens[0, :3]])]).astype(np.int32)
  positions = np.stack([np.arange(6), np.arange(6) - 3])
  step = jax.jit(lambda params, x, pos, cache: model.apply({"params": params}, x, None, pos, cache=cache))
  logits, cache = step(params, prompt, positions, init_cache(model.cfg, 2, 24))
  np.testing.assert_allclose(logits[0], full[0, :6], atol=1e-5)
  np.testing.assert_allclose(logits[1, 3:], full[0, :3], atol=1e-5)
  for t in range(6, 20):
    x = np.array([[tokens[0, t]], [tokens[0, t - 3]]], np.int32)
    logits, cache = step(params, x, np.array([[t], [t - 3]]), cache)
    np.testing.assert_allclose(logits[0, 0], full[0, t], atol=1e-5)
    np.testing.assert_allclose(logits[1, 0], full[0, t - 3], atol=1e-5)


def make_sampler(model):
  from lm.tokenizer import EOS_ID, ByteTokenizer

  return sampling.Sampler.for_model(model, 64, ByteTokenizer(), EOS_ID)


@pytest.fixture(scope="module")
def tiny():
  """A model, its params and one sampler, shared so that tests of the same shapes compile once."""
  model, params = tiny_model()
  return model, params, make_sampler(model)


def test_greedy_batch_of_different_lengths_equals_the_uncached_argmax_chain(tiny):
  model, params, sampler = tiny
  prompts = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30]]
  greedy = sampling.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
  out = sampler.generate(params, prompts, [greedy] * 3)
  forward = full_forward(model)
  for prompt, gen in zip(prompts, out, strict=True):
    seq = np.zeros((1, 32), np.int32)  # causal: what follows the sequence so far does not matter
    seq[0, : len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + 12):
      seq[0, n] = int(jnp.argmax(forward(params, seq)[0, n - 1]))
    assert gen.tokens == seq[0, len(prompt) : len(prompt) + 12].tolist()
    full = jax.nn.log_softmax(forward(params, seq)[0], axis=-1)
    expected = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(gen.tokens)]
    np.testing.assert_allclose(gen.logprobs, expected, atol=1e-4)


def test_seed_determinism_and_stops(tiny):
  _, params, sampler = tiny
  request = sampling.SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
  a = sampler.generate(params, [[40, 41]], [request])[0]
  b = sampler.generate(params, [[40, 41], [50, 51]], [request, request])[0]
  assert a.tokens == b.tokens and len(a.tokens) == 20
  c = sampler.generate(params, [[40, 41]], [dataclasses.replace(request, seed=8)])[0]
  assert c.tokens != a.tokens
  stop = a.tokens[5]
  cut = sampler.generate(params, [[40, 41]], [dataclasses.replace(request, stop_tokens=(stop,))])
  assert cut[0].tokens == a.tokens[: a.tokens.index(stop)] and cut[0].finish_reason == "stop"
  text = a.text
  assert len(text) > 4
  by_string = sampler.generate(params, [[40, 41]], [dataclasses.replace(request, stop_strings=(text[3:5],))])[0]
  assert by_string.text == text[: text.find(text[3:5])] and by_string.finish_reason == "stop"


def test_prompt_too_long_and_empty_prompt(tiny):
  _, params, sampler = tiny
  with pytest.raises(UserError, match="exceeds the context"):
    sampler.generate(params, [list(range(7, 60))], [sampling.SamplingParams(max_new_tokens=20)])
  with pytest.raises(UserError, match="empty prompt"):
    sampler.generate(params, [[]], [sampling.SamplingParams(max_new_tokens=2)])


def test_stream_yields_growing_chunks_that_end_in_the_generated_text(tiny):
  _, params, sampler = tiny
  prompts = [[10, 11], [20, 21, 22, 23]]
  requests = [
    sampling.SamplingParams(max_new_tokens=13, temperature=0.0, ignore_eos=True),
    sampling.SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
  ]
  chunks = list(sampler.stream(params, prompts, requests, first_chunk=2, chunk=4))
  assert [len(c.tokens[0]) for c in chunks] == [2, 6, 10, 13]  # 2, then doubling up to 4 steps a chunk
  assert [len(c.tokens[1]) for c in chunks] == [2, 5, 5, 5] and chunks[1].finished[1]
  assert chunks[-1].finished == [True, True]
  for earlier, later in zip(chunks, chunks[1:], strict=False):
    assert later.tokens[0][: len(earlier.tokens[0])] == earlier.tokens[0]
  final = sampler.generate(params, prompts, requests)
  assert [g.tokens for g in final] == chunks[-1].tokens
  assert [g.finish_reason for g in final] == ["length", "length"]


def test_frequency_penalty_in_the_decode_loop_forbids_repeats(tiny):
  _, params, sampler = tiny
  prompt = [10, 11, 12, 10]
  request = sampling.SamplingParams(max_new_tokens=13, temperature=0.0, frequency_penalty=1e3, ignore_eos=True)
  plain = sampling.SamplingParams(max_new_tokens=13, temperature=0.0, ignore_eos=True)
  penalized, greedy = sampler.generate(params, [prompt, prompt], [request, plain])
  assert len(set(penalized.tokens)) == 13 and not set(penalized.tokens) & set(prompt)
  assert len(set(greedy.tokens)) < 13  # the unpenalized chain of this model does repeat


def test_the_sampling_engine_imports_no_training_module():
  code = "import json, sys, lm.sampling; print(json.dumps([m for m in sys.modules if m.startswith('lm.')]))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
  loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
  assert "lm.sampling" in loaded
  assert not loaded & {"lm.train", "lm.loop", "lm.step", "lm.state", "lm.workdir", "lm.objectives"}, loaded


def test_printable_text_holds_back_partial_characters_and_stop_strings():
  request = sampling.SamplingParams(stop_strings=("\n\n", "END"))
  assert sample_cli._shown("abc\ufffd", request, final=False) == "abc"
  assert sample_cli._shown("abc\n", request, final=False) == "abc"
  assert sample_cli._shown("abcEN", request, final=False) == "abc"
  assert sample_cli._shown("abcE!", request, final=False) == "abcE!"
  assert sample_cli._shown("abc\n", request, final=True) == "abc\n"


def test_encode_prompt_checks_and_truncates():
  from lm.tokenizer import BOS_ID, ByteTokenizer

  tok = ByteTokenizer()
  assert sampling.encode_prompt(tok, "ab", 16, 4) == [BOS_ID] + tok.encode(["ab"])[0]
  with pytest.raises(UserError, match="empty prompt"):
    sampling.encode_prompt(tok, "", 16, 4)
  with pytest.raises(UserError, match=r"prompt \(22 tokens\) \+ max_new_tokens \(4\) exceeds the context of 16"):
    sampling.encode_prompt(tok, "x" * 19 + "yz", 16, 4)
  assert sampling.encode_prompt(tok, "x" * 19 + "yz", 16, 4, "left") == tok.encode(["x" * 10 + "yz"])[0]


# Runs in a fresh process with 8 simulated CPU devices: `tiny_model()`'s params laid out on a
# (data 2, fsdp 2, tensor 2) mesh by the training sharding rules, sampled under that mesh.
SHARDED_SCRIPT = """
import json, sys
import flax.linen as nn
import jax
import jax.numpy as jnp
sys.path.insert(0, "tests")
from conftest import tiny_config
from lm import partitioning, sampling
from sampling_test import SHARDED_REQUESTS, tiny_model

model, params = tiny_model()
mesh = partitioning.make_mesh(tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
rules = partitioning.rules_for(model.cfg, mesh)
boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
params = jax.device_put(nn.unbox(params), partitioning.logical_shardings(boxed, mesh, rules))
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  out = sampling.Sampler.for_model(model, 64).generate(params, *SHARDED_REQUESTS)
wq = str(params["layer_0"]["attn"]["wq"].sharding.spec)
print(json.dumps({"tokens": [g.tokens for g in out], "logprobs": [g.logprobs for g in out], "wq": wq}))
"""
# Two rows (fewer than the 4 data-parallel devices) with the shapes of the streaming test above.
SHARDED_REQUESTS = (
  [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26]],
  [
    sampling.SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
    sampling.SamplingParams(
      max_new_tokens=9,
      temperature=0.9,
      top_k=30,
      top_p=0.95,
      min_p=0.05,
      repetition_penalty=1.3,
      seed=3,
      frequency_penalty=0.2,
      ignore_eos=True,
    ),
  ],
)


def test_sharded_params_on_the_training_mesh_give_the_single_device_samples(tiny):
  from conftest import run_devices_script

  _, params, sampler = tiny
  single = sampler.generate(params, *SHARDED_REQUESTS)
  mixed = run_devices_script(SHARDED_SCRIPT, devices=8)
  assert "tensor" in mixed["wq"] and "fsdp" in mixed["wq"]
  assert mixed["tokens"] == [g.tokens for g in single] and [len(t) for t in mixed["tokens"]] == [12, 9]
  for got, want in zip(mixed["logprobs"], single, strict=True):
    np.testing.assert_allclose(got, want.logprobs, atol=1e-4)


class PieceTokenizer:
  """A tokenizer whose ids are the indices of multi-character pieces."""

  def __init__(self, pieces):
    self.pieces = pieces

  def decode(self, ids):
    return "".join(self.pieces[i] for i in ids)


def test_a_stop_string_ends_the_tokens_with_the_last_one_that_begins_before_it():
  tok = PieceTokenizer(["ab", "c\n", "\nd", "e", "\n\n", "x"])
  request = sampling.SamplingParams(stop_strings=("\n\n",))
  logprobs = [-0.1, -0.2, -0.3, -0.4, -0.5]
  # "c\n" straddles the stop string's beginning: kept, with its share "c"; "\nd" lies inside it: dropped.
  g = sampling.finish(tok, request, [0, 1, 2, 3], logprobs, eos_id=-1)
  assert (g.text, g.tokens, g.logprobs, g.finish_reason) == ("abc", [0, 1], [-0.1, -0.2], "stop")
  assert sampling.token_texts(tok, g.tokens, g.text) == ["ab", "c"]
  # A token that is the whole stop string, and the ones after it, are dropped.
  g = sampling.finish(tok, request, [0, 4, 5], logprobs, eos_id=-1)
  assert (g.text, g.tokens, g.logprobs) == ("ab", [0], [-0.1])
  g = sampling.finish(tok, request, [4, 5], logprobs, eos_id=-1)
  assert (g.text, g.tokens, g.logprobs) == ("", [], [])
  g = sampling.finish(tok, request, [0, 3, 5], logprobs, eos_id=-1)  # no stop: every token, its whole text
  assert (g.text, g.tokens, g.finish_reason) == ("abex", [0, 3, 5], "length")
  assert sampling.token_texts(tok, g.tokens, g.text) == ["ab", "e", "x"]


def test_token_texts_give_a_split_character_to_the_token_that_completes_it():
  from lm.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  ids = tok.encode(["a\u00e9b\n\nz"])[0]  # a, two bytes of é, b, \n, \n, z
  request = sampling.SamplingParams(stop_strings=("\n\n",))
  g = sampling.finish(tok, request, ids, [0.0] * len(ids), eos_id=-1)
  assert g.text == "a\u00e9b" and g.tokens == ids[:4]
  assert sampling.token_texts(tok, g.tokens, g.text) == ["a", "", "\u00e9", "b"]
