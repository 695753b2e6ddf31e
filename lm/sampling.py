"""Autoregressive sampling with a KV cache: prefill once, then one jitted loop of decode steps.

A batch holds prompts of different lengths, right-padded; each row keeps its own position, so
row b writes its next key/value at slot `length_b + i` of the cache. Every decoding control is
per row (a request), so one batch can mix greedy and nucleus sampling:
- `temperature` (0 = greedy), `top_k` (0 = off), `top_p` (1 = off), `min_p` (0 = off);
- `repetition_penalty` (CTRL-style: seen tokens' positive logits are divided by it, negative
  ones multiplied) and `frequency_penalty` (subtracted once per earlier occurrence);
- `stop_tokens` (ids; the EOS id stops too unless `ignore_eos`) and `stop_strings` (checked on the host between
  chunks of the loop, and cut from the text);
- `max_new_tokens` and `seed`: the same seed gives the same tokens.
Returned log-probabilities are the model's own (log-softmax of the raw logits), whatever the
filters, so they score the text rather than the sampler.
"""

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's decoding controls."""

  max_new_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  frequency_penalty: float = 0.0
  stop_tokens: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  seed: int = 0
  ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

  def validate(self, context: int | None = None) -> None:
    if self.temperature < 0:
      raise UserError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise UserError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 <= self.min_p < 1.0:
      raise UserError(f"min_p must be in [0, 1), got {self.min_p}")
    if self.repetition_penalty <= 0:
      raise UserError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if context is not None and self.max_new_tokens >= context:
      raise UserError(f"max_new_tokens ({self.max_new_tokens}) must be less than the context ({context})")


def filter_logits(
  logits_BxV: jax.Array,
  temperature_B: jax.Array,
  top_k_B: jax.Array,
  top_p_B: jax.Array,
  min_p_B: jax.Array,
) -> jax.Array:
  """Tempered logits with the tokens outside each row's top-k / top-p / min-p support at -inf.

  top-p keeps the smallest set of most likely tokens whose probability reaches p (ties at the
  boundary are kept). Rows with temperature 0 are left for the caller's argmax.
  """
  v = logits_BxV.shape[-1]
  safe_t_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
  scaled_BxV = logits_BxV / safe_t_B[:, None]
  sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
  kth_B = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)[:, 0]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of strictly more likely tokens
  # A set whose mass is within float rounding of p has reached it.
  n_keep_B = jnp.maximum(jnp.sum(before_BxV < top_p_B[:, None] - 1e-6, axis=-1), 1)
  pth_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
  min_logit_B = sorted_BxV[:, 0] + jnp.log(jnp.maximum(min_p_B, 1e-30))  # p >= min_p * p_max
  threshold_B = jnp.maximum(jnp.maximum(kth_B, pth_B), jnp.where(min_p_B > 0, min_logit_B, -jnp.inf))
  return jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)


def penalize(logits_BxV: jax.Array, counts_BxV: jax.Array, repetition_B: jax.Array, frequency_B: jax.Array):
  """Applies repetition and frequency penalties given each row's token counts so far."""
  seen_BxV = counts_BxV > 0
  rep_BxV = jnp.where(logits_BxV > 0, logits_BxV / repetition_B[:, None], logits_BxV * repetition_B[:, None])
  logits_BxV = jnp.where(seen_BxV, rep_BxV, logits_BxV)
  return logits_BxV - frequency_B[:, None] * counts_BxV


def choose(keys_B: jax.Array, logits_BxV: jax.Array, temperature_B: jax.Array, filtered_BxV: jax.Array) -> jax.Array:
  """Greedy where temperature is 0, else a draw from the filtered distribution (a key per row)."""
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV)
  return jnp.where(temperature_B > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  """What `generate` returns per row: new token ids, their log-probs and the decoded text."""

  tokens: list[int]
  logprobs: list[float]
  text: str
  finish_reason: str  # "stop" (stop token or string) or "length"


class Sampler:
  """Generates from a model and params with a KV cache; one jitted prefill and one decode loop.

  `apply_fn(params, tokens_BxT, positions_BxT, cache) -> (logits_BxTxV, cache)` runs the model
  on new tokens at the given positions, reading and writing the cache; `init_cache(batch, length)`
  makes an empty one.
  """

  @classmethod
  def for_model(cls, model, context: int, tokenizer, eos_id: int) -> "Sampler":
    """A sampler for an `lm.model.Transformer`."""
    from lm import model as model_lib  # noqa: PLC0415

    def apply_fn(params, tokens_BxT, positions_BxT, cache):
      return model.apply({"params": params}, tokens_BxT, None, positions_BxT, cache=cache)

    return cls(apply_fn, lambda b, n: model_lib.init_cache(model.cfg, b, n), context, tokenizer, eos_id)

  def __init__(self, apply_fn: Callable, init_cache: Callable, context: int, tokenizer, eos_id: int):
    self.apply_fn, self.init_cache, self.context = apply_fn, init_cache, context
    self.tokenizer, self.eos_id = tokenizer, eos_id
    self._prefill = jax.jit(self._prefill_impl)
    self._decode = jax.jit(self._decode_impl, static_argnames=("steps",), donate_argnames=("state",))

  def _prefill_impl(self, params, prompt_BxP, lengths_B, cache):
    positions_BxP = jnp.broadcast_to(jnp.arange(prompt_BxP.shape[1], dtype=jnp.int32), prompt_BxP.shape)
    logits_BxPxV, cache = self.apply_fn(params, prompt_BxP, positions_BxP, cache)
    last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return last_BxV, cache

  def _decode_impl(self, params, state: dict, controls: dict, steps: int) -> dict:
    """Runs `steps` decode steps inside one `lax.fori_loop`; finished rows keep emitting EOS."""

    def body(i, s):
      split_Bx2 = jax.vmap(jax.random.split)(s["key"])
      key, sub = split_Bx2[:, 0], split_Bx2[:, 1]
      logits_BxV = s["logits"]
      logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
      penalized_BxV = penalize(logits_BxV, s["counts"], controls["repetition"], controls["frequency"])
      filtered_BxV = filter_logits(
        penalized_BxV, controls["temperature"], controls["top_k"], controls["top_p"], controls["min_p"]
      )
      token_B = choose(sub, penalized_BxV, controls["temperature"], filtered_BxV)
      token_B = jnp.where(s["done"], self.eos_id, token_B)
      logprob_B = jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
      stop_B = jnp.any(token_B[:, None] == controls["stop_tokens"], axis=-1)
      b = jnp.arange(token_B.shape[0])
      logits_Bx1xV, cache = self.apply_fn(params, token_B[:, None], s["position"][:, None], s["cache"])
      return {
        "key": key,
        "logits": logits_Bx1xV[:, 0],
        "cache": cache,
        "position": s["position"] + 1,
        "counts": s["counts"].at[b, token_B].add(1),
        "done": s["done"] | stop_B,
        "tokens": s["tokens"].at[:, s["step"] + i].set(token_B),
        "logprobs": s["logprobs"].at[:, s["step"] + i].set(jnp.where(s["done"], 0.0, logprob_B)),
        "n_new": s["n_new"] + (~s["done"]).astype(jnp.int32),
        "step": s["step"],
      }

    state = jax.lax.fori_loop(0, steps, body, state)
    return dict(state, step=state["step"] + steps)

  def stream(
    self, params, prompts: list[list[int]], requests: list[SamplingParams], chunk: int = 32
  ) -> Iterator[tuple[list[list[int]], jax.Array]]:
    """Yields, after each chunk of decode steps, every row's new tokens so far and the log-probs."""
    b = len(prompts)
    max_new = max(r.max_new_tokens for r in requests)
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
      raise UserError("empty prompt")
    if longest + max_new > self.context:
      raise UserError(
        f"prompt ({longest} tokens) + max_new_tokens ({max_new}) exceeds the context of {self.context} tokens"
      )
    prompt_BxP = np.zeros((b, longest), np.int32)
    for i, p in enumerate(prompts):
      prompt_BxP[i, : len(p)] = p
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    cache = self.init_cache(b, longest + max_new)
    logits_BxV, cache = self._prefill(params, prompt_BxP, lengths_B, cache)
    stops = [stop_ids(r, self.eos_id) for r in requests]
    stop_tokens = np.full((b, max(len(x) for x in stops) + 1), -1, np.int32)
    for i, row in enumerate(stops):
      stop_tokens[i, : len(row)] = row
    controls = {
      "temperature": jnp.array([r.temperature for r in requests], jnp.float32),
      "top_k": jnp.array([r.top_k for r in requests], jnp.int32),
      "top_p": jnp.array([r.top_p for r in requests], jnp.float32),
      "min_p": jnp.array([r.min_p for r in requests], jnp.float32),
      "repetition": jnp.array([r.repetition_penalty for r in requests], jnp.float32),
      "frequency": jnp.array([r.frequency_penalty for r in requests], jnp.float32),
      "stop_tokens": jnp.asarray(stop_tokens),
    }
    counts = np.zeros((b, logits_BxV.shape[-1]), np.float32)
    for i, p in enumerate(prompts):
      np.add.at(counts[i], p, 1)
    limit_B = np.array([r.max_new_tokens for r in requests])
    state = {
      "key": jax.vmap(jax.random.key)(jnp.array([r.seed for r in requests], jnp.uint32)),
      "logits": logits_BxV,
      "cache": cache,
      "position": jnp.asarray(lengths_B),
      "counts": jnp.asarray(counts),
      "done": jnp.asarray(limit_B <= 0),
      "tokens": jnp.zeros((b, max_new), jnp.int32),
      "logprobs": jnp.zeros((b, max_new), jnp.float32),
      "n_new": jnp.zeros((b,), jnp.int32),
      "step": jnp.zeros((), jnp.int32),
    }
    done_steps = 0
    while done_steps < max_new:
      steps = min(chunk, max_new - done_steps)
      state = self._decode(params, state, controls, steps=steps)
      done_steps += steps
      tokens, n_new = jax.device_get((state["tokens"], state["n_new"]))
      n_new = np.minimum(n_new, limit_B)
      yield [list(tokens[i, : n_new[i]]) for i in range(b)], state["logprobs"]
      finished_B = jax.device_get(state["done"]) | (n_new >= limit_B)
      for i, r in enumerate(requests):
        if r.stop_strings and not finished_B[i]:
          finished_B[i] = any(x in self.tokenizer.decode(tokens[i, : n_new[i]]) for x in r.stop_strings)
      if finished_B.all():
        break

  def generate(self, params, prompts: list[list[int]], requests: list[SamplingParams]) -> list[Generation]:
    """Runs `stream` to the end and returns each row's tokens, log-probs and text."""
    *_, (tokens, logprobs) = self.stream(params, prompts, requests, chunk=max(r.max_new_tokens for r in requests))
    rows = zip(requests, tokens, np.asarray(jax.device_get(logprobs)), strict=True)
    return [finish(self.tokenizer, r, tokens, row_logprobs, self.eos_id) for r, tokens, row_logprobs in rows]


def stop_ids(request: SamplingParams, eos_id: int) -> tuple[int, ...]:
  return tuple(request.stop_tokens) + (() if request.ignore_eos else (eos_id,))


def finish(tokenizer, request: SamplingParams, tokens: list[int], logprobs, eos_id: int) -> Generation:
  """Cuts a row at its first stop token or stop string; the stop itself is not returned."""
  reason, stops = "length", stop_ids(request, eos_id)
  for i, t in enumerate(tokens):
    if t in stops:
      tokens, reason = tokens[:i], "stop"
      break
  text = tokenizer.decode(tokens)
  for s in request.stop_strings:
    at = text.find(s)
    if at >= 0:
      text, reason = text[:at], "stop"
  return Generation([int(t) for t in tokens], [float(x) for x in logprobs[: len(tokens)]], text, reason)
