"""Autoregressive sampling with a KV cache: one jitted prefill, then a jitted loop of decode steps.

Prompts of different lengths are left-padded to a common length, so every row writes its next
key and value to the same cache slot (an in-place update); each row keeps its own positions and
its padding is masked out. Every decoding control is per row (a request), so one batch can mix
greedy and nucleus sampling:
- `temperature` (0 = greedy), `top_k` (0 = off), `top_p` (1 = off), `min_p` (0 = off);
- `repetition_penalty` (CTRL-style: seen tokens' positive logits are divided by it, negative
  ones multiplied) and `frequency_penalty` (subtracted once per earlier occurrence), both
  counting the prompt's tokens too;
- `stop_tokens` (ids; the EOS id stops too unless `ignore_eos`) and `stop_strings` (checked on the
  host between chunks of the loop; the text ends where the first one begins, and the tokens and
  log-probs end with the last token whose text begins before it, see `finish`);
- `max_new_tokens` and `seed`: the same seed gives the same tokens, whatever else is in the batch.
Returned log-probabilities are the model's own (log-softmax of the raw logits), whatever the
filters, so they score the text rather than the sampler.

The decode loop is one `lax.while_loop` that runs a given number of steps or until every row is
done; `stream` runs it in growing chunks and yields between them, so text shows as it is made.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import UserError
from lm.tokenizer import EOS_ID

BUCKET = 16  # prompt and generation lengths are padded to multiples of this


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
      raise UserError(f"max_new_tokens ({self.max_new_tokens}) must be less than the context ({context} tokens)")
    if not 0 <= self.seed < 2**32:
      raise UserError(f"seed must be in [0, 2**32), got {self.seed}")


def filter_logits(
  logits_BxV: jax.Array,
  temperature_B: jax.Array,
  top_k_B: jax.Array,
  top_p_B: jax.Array,
  min_p_B: jax.Array,
) -> jax.Array:
  """Tempered logits with the tokens outside each row's top-k / top-p / min-p support at -inf.

  top-p keeps the smallest set of most likely tokens whose probability reaches p (ties at the
  boundary are kept). Rows with temperature 0 are left for the caller's argmax. The sort that
  top-k and top-p need is skipped when no row asks for either.
  """
  v = logits_BxV.shape[-1]
  safe_t_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
  scaled_BxV = logits_BxV / safe_t_B[:, None]

  def sorted_cut():
    sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
    kth_B = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)[:, 0]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of strictly more likely tokens
    # A set whose mass is within float rounding of p has reached it.
    n_keep_B = jnp.maximum(jnp.sum(before_BxV < top_p_B[:, None] - 1e-6, axis=-1), 1)
    pth_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
    return jnp.maximum(kth_B, pth_B)

  no_cut_B = jnp.full(temperature_B.shape, -jnp.inf)
  cut_B = jax.lax.cond(jnp.any((top_k_B > 0) | (top_p_B < 1)), sorted_cut, lambda: no_cut_B)
  min_logit_B = jnp.max(scaled_BxV, axis=-1) + jnp.log(jnp.maximum(min_p_B, 1e-30))  # p >= min_p * p_max
  threshold_B = jnp.maximum(cut_B, jnp.where(min_p_B > 0, min_logit_B, -jnp.inf))
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


def next_tokens(keys_B: jax.Array, logits_BxV: jax.Array, counts_BxV: jax.Array, controls: dict) -> jax.Array:
  """Each row's next token under its controls; the work a batch does not need is skipped.

  Penalties apply only when some row sets one, and filters and the draw only when some row
  samples: greedy decoding is an argmax.
  """
  t_B = controls["temperature"]
  penalized_BxV = jax.lax.cond(
    jnp.any((controls["repetition"] != 1) | (controls["frequency"] != 0)),
    lambda x: penalize(x, counts_BxV, controls["repetition"], controls["frequency"]),
    lambda x: x,
    logits_BxV,
  )

  def sample(x_BxV):
    filtered_BxV = filter_logits(x_BxV, t_B, controls["top_k"], controls["top_p"], controls["min_p"])
    return choose(keys_B, x_BxV, t_B, filtered_BxV)

  return jax.lax.cond(jnp.any(t_B > 0), sample, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), penalized_BxV)


@dataclasses.dataclass
class Generation:
  """One row's result: new token ids, their log-probs and the decoded text."""

  tokens: list[int]
  logprobs: list[float]
  text: str
  finish_reason: str  # "stop" (stop token or string) or "length"


@dataclasses.dataclass
class Progress:
  """Every row's new tokens and log-probs so far, after a chunk of decode steps."""

  tokens: list[list[int]]
  logprobs: list[list[float]]
  finished: list[bool]


class Sampler:
  """Generates from a model and params with a KV cache: one jitted prefill and one decode loop.

  `apply_fn(params, tokens_BxT, positions_BxT, cache) -> (logits_BxTxV, cache)` runs the model
  on new tokens, reading and writing the cache (`lm.model.Transformer` semantics);
  `init_cache(batch, length)` makes an empty one. Calls trace under the caller's context, so a
  sampler used inside a mesh and its axis rules runs sharded like training does.
  """

  @classmethod
  def for_model(cls, model, context: int, tokenizer=None, eos_id: int | None = None) -> "Sampler":
    """A sampler for an `lm.model.Transformer`; `tokenizer` is needed for text and stop strings. Sampling ends
    at `eos_id`, by default the tokenizer's end-of-sequence id (lm's own tokenizers': EOS_ID)."""
    from lm import model as model_lib  # noqa: PLC0415

    def apply_fn(params, tokens_BxT, positions_BxT, cache):
      return model.apply({"params": params}, tokens_BxT, None, positions_BxT, cache=cache)

    return cls(apply_fn, functools.partial(model_lib.init_cache, model.cfg), context, tokenizer, eos_id)

  def __init__(self, apply_fn: Callable, init_cache: Callable, context: int, tokenizer=None, eos_id: int | None = None):
    self.apply_fn, self.init_cache, self.context = apply_fn, init_cache, context
    self.tokenizer = tokenizer
    self.eos_id = eos_id if eos_id is not None else tokenizer.eos_id if tokenizer is not None else EOS_ID
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("length",))
    self._decode = jax.jit(self._decode_impl, donate_argnames=("state",))

  def compiles(self) -> int:
    """Programs compiled so far (prefill and decode loop): what a caller that keeps its shapes fixed keeps at 2."""
    return self._prefill._cache_size() + self._decode._cache_size()

  def _prefill_impl(self, params, prompt_BxP, positions_BxP, length: int):
    logits_BxPxV, cache = self.apply_fn(params, prompt_BxP, positions_BxP, self.init_cache(prompt_BxP.shape[0], length))
    return logits_BxPxV[:, -1], cache

  def _decode_impl(self, params, state: dict, controls: dict, steps: jax.Array) -> dict:
    """Up to `steps` decode steps, fewer if every row is done; done rows are fed EOS and not counted."""

    def body(s):
      split_Bx2 = jax.vmap(jax.random.split)(s["key"])
      token_B = next_tokens(split_Bx2[:, 1], s["logits"], s["counts"], controls)
      token_B = jnp.where(s["done"], self.eos_id, token_B)
      logprob_B = jnp.take_along_axis(jax.nn.log_softmax(s["logits"], axis=-1), token_B[:, None], axis=-1)[:, 0]
      n_new_B = s["n_new"] + (~s["done"]).astype(jnp.int32)
      stop_B = jnp.any(token_B[:, None] == controls["stop_tokens"], axis=-1) | (n_new_B >= controls["max_new"])
      logits_Bx1xV, cache = self.apply_fn(params, token_B[:, None], s["position"][:, None], s["cache"])
      b = jnp.arange(token_B.shape[0])
      return {
        "key": split_Bx2[:, 0],
        "logits": logits_Bx1xV[:, 0],
        "cache": cache,
        "position": s["position"] + 1,
        "counts": s["counts"].at[b, token_B].add(1),
        "done": s["done"] | stop_B,
        "tokens": jax.lax.dynamic_update_slice(s["tokens"], token_B[:, None], (0, s["step"])),
        "logprobs": jax.lax.dynamic_update_slice(s["logprobs"], logprob_B[:, None], (0, s["step"])),
        "n_new": n_new_B,
        "step": s["step"] + 1,
        "left": s["left"] - 1,
      }

    state = jax.lax.while_loop(lambda s: (s["left"] > 0) & ~jnp.all(s["done"]), body, dict(state, left=steps))
    del state["left"]
    return state

  def _start(
    self, params, prompts: list[list[int]], requests: list[SamplingParams], prompt_length: int | None = None
  ) -> tuple[dict, dict]:
    """Checks the requests, prefills the left-padded prompts and returns (state, controls). With `prompt_length`,
    prompts are padded to at least that many tokens, so batches of any prompts share one compiled program."""
    assert len(prompts) == len(requests)
    for r in requests:
      r.validate(self.context)
      if r.stop_strings and self.tokenizer is None:
        raise UserError("stop strings need a sampler with a tokenizer")
    for p, r in zip(prompts, requests, strict=True):
      if not p:
        raise UserError("empty prompt")
      if len(p) + r.max_new_tokens > self.context:
        raise UserError(
          f"prompt ({len(p)} tokens) + max_new_tokens ({r.max_new_tokens}) exceeds the context of {self.context} tokens"
        )
    # Padding both lengths up to a multiple of BUCKET lets requests of similar sizes share compiled programs.
    b, longest = len(prompts), -(-max(len(p) for p in prompts) // BUCKET) * BUCKET
    longest = max(longest, prompt_length or 0)
    max_new = -(-max(r.max_new_tokens for r in requests) // BUCKET) * BUCKET
    prompt_BxP = np.full((b, longest), self.eos_id, np.int32)
    positions_BxP = np.zeros((b, longest), np.int32)
    for i, p in enumerate(prompts):
      prompt_BxP[i, longest - len(p) :] = p
      positions_BxP[i] = np.arange(longest) - (longest - len(p))  # padding gets negative positions
    logits_BxV, cache = self._prefill(params, prompt_BxP, positions_BxP, length=longest + max_new)
    counts_BxV = np.zeros((b, logits_BxV.shape[-1]), np.float32)
    for i, p in enumerate(prompts):
      np.add.at(counts_BxV[i], p, 1)
    stops = [stop_ids(r, self.eos_id) for r in requests]
    stop_tokens = np.full((b, max(len(x) for x in stops) + 1), -1, np.int32)
    for i, row in enumerate(stops):
      stop_tokens[i, : len(row)] = row
    controls = {
      "temperature": np.array([r.temperature for r in requests], np.float32),
      "top_k": np.array([r.top_k for r in requests], np.int32),
      "top_p": np.array([r.top_p for r in requests], np.float32),
      "min_p": np.array([r.min_p for r in requests], np.float32),
      "repetition": np.array([r.repetition_penalty for r in requests], np.float32),
      "frequency": np.array([r.frequency_penalty for r in requests], np.float32),
      "stop_tokens": stop_tokens,
      "max_new": np.array([r.max_new_tokens for r in requests], np.int32),
    }
    state = {
      "key": jax.vmap(jax.random.key)(np.array([r.seed for r in requests], np.uint32)),
      "logits": logits_BxV,
      "cache": cache,
      "position": np.array([len(p) for p in prompts], np.int32),
      "counts": counts_BxV,
      "done": np.zeros((b,), bool),
      "tokens": np.zeros((b, max_new), np.int32),
      "logprobs": np.zeros((b, max_new), np.float32),
      "n_new": np.zeros((b,), np.int32),
      "step": np.zeros((), np.int32),
    }
    return state, controls

  def stream(
    self,
    params,
    prompts: list[list[int]],
    requests: list[SamplingParams],
    first_chunk: int = 4,
    chunk: int = 64,
    prompt_length: int | None = None,
  ) -> Iterator[Progress]:
    """Yields every row's progress after each chunk of decode steps: `first_chunk` steps, then
    twice as many each time up to `chunk`. Ends once every row has stopped. A row's tokens include the
    stop token that ended it. `prompt_length` as `_start`."""
    state, controls = self._start(params, prompts, requests, prompt_length)
    steps = first_chunk
    while True:
      state = self._decode(params, state, controls, np.int32(steps))
      tokens, logprobs, n_new, done = jax.device_get(
        (state["tokens"], state["logprobs"], state["n_new"], state["done"])
      )
      progress = Progress(
        [row[:n].tolist() for row, n in zip(tokens, n_new, strict=True)],
        [row[:n].tolist() for row, n in zip(logprobs, n_new, strict=True)],
        done.tolist(),
      )
      for i, r in enumerate(requests):
        if r.stop_strings and not done[i]:
          text = self.tokenizer.decode(progress.tokens[i])
          progress.finished[i] = any(s in text for s in r.stop_strings)
      yield progress
      if all(progress.finished):
        return
      state["done"] = np.asarray(progress.finished)
      steps = min(2 * steps, chunk)

  def generate(self, params, prompts: list[list[int]], requests: list[SamplingParams]) -> list[Generation]:
    """Every row's tokens, log-probs and text (empty without a tokenizer), cut at its stops."""
    longest = max(r.max_new_tokens for r in requests)
    *_, last = self.stream(params, prompts, requests, first_chunk=longest, chunk=longest)
    return [
      finish(self.tokenizer, r, tokens, logprobs, self.eos_id)
      for r, tokens, logprobs in zip(requests, last.tokens, last.logprobs, strict=True)
    ]

  def generate_all(
    self, params, prompts: list[list[int]], requests: list[SamplingParams], batch_size: int
  ) -> list[Generation]:
    """`generate` on any number of prompts, `batch_size` at a time, the last batch padded with copies of its
    first prompt so every batch has one shape (a row's result does not depend on its batch: its seed is its
    request's)."""
    if batch_size < 1:
      raise UserError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = min(batch_size, len(prompts))
    out = []
    for lo in range(0, len(prompts), batch_size):
      batch, batch_requests = prompts[lo : lo + batch_size], requests[lo : lo + batch_size]
      pad = batch_size - len(batch)
      out += self.generate(params, batch + batch[:1] * pad, batch_requests + batch_requests[:1] * pad)[: len(batch)]
    return out


def stop_ids(request: SamplingParams, eos_id: int) -> tuple[int, ...]:
  return tuple(request.stop_tokens) + (() if request.ignore_eos else (eos_id,))


def finish(tokenizer, request: SamplingParams, tokens: list[int], logprobs: list[float], eos_id: int) -> Generation:
  """Cuts a row at its first stop token or stop string; the stop itself is not returned.

  At a stop string the text ends where the string begins, and the tokens (and log-probs) are those whose
  text begins before it (`text_starts`): tokens after the stop string, or inside it, are dropped; a token
  that straddles its beginning is kept, and its share of the text (`token_texts`) is the part before it.
  """
  reason, stops = "length", stop_ids(request, eos_id)
  for i, t in enumerate(tokens):
    if t in stops:
      tokens, reason = tokens[:i], "stop"
      break
  text = tokenizer.decode(tokens) if tokenizer is not None else ""
  at = min((text.find(s) for s in request.stop_strings if s in text), default=-1)
  if at >= 0:
    kept = sum(start < at for start in text_starts(tokenizer, tokens, text)[:-1])
    tokens, text, reason = tokens[:kept], text[:at], "stop"
  return Generation([int(t) for t in tokens], [float(x) for x in logprobs[: len(tokens)]], text, reason)


def text_starts(tokenizer, tokens: list[int], text: str) -> list[int]:
  """Where in `text` (the tokens' decoded text, or its beginning) each token's text starts, then where `text`
  ends: 0 = b[0] <= b[1] <= ... <= b[n] = len(text).

  b[k] is how far the decoded text of the first k tokens agrees with `text`, so a token that ends inside a
  UTF-8 character (decoded alone as U+FFFD) leaves the character to the token that completes it.
  """
  if not tokens:
    return [0]
  starts = [0]
  for k in range(1, len(tokens)):
    starts.append(max(starts[-1], len(os.path.commonprefix([tokenizer.decode(tokens[:k]), text]))))
  return [*starts, len(text)]


def token_texts(tokenizer, tokens: list[int], text: str) -> list[str]:
  """Each token's share of `text` (see `text_starts`); together they are `text`."""
  b = text_starts(tokenizer, tokens, text)
  return [text[b[k] : b[k + 1]] for k in range(len(tokens))]


def encode_prompt(tokenizer, text: str, context: int, max_new_tokens: int, truncate: str = "none") -> list[int]:
  """[BOS] + the text's tokens, as documents begin in training. A prompt that leaves too little
  room for `max_new_tokens` is an error, or keeps its last tokens with `truncate="left"`."""
  if not text:
    raise UserError("empty prompt")
  ids = [tokenizer.bos_id] + tokenizer.encode([text])[0]
  room = context - max_new_tokens
  if len(ids) > room:
    if truncate != "left":
      raise UserError(
        f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of {context} tokens; "
        "shorten the prompt, lower --max-new-tokens or pass --truncate left"
      )
    ids = ids[-room:]
  return ids


class EvalSamples:
  """Completions of the fixed prompts `train.sample_prompts` from the params being trained.

  One sampler is built (and compiled) once and reused at every eval. A prompt longer than the
  context allows keeps its last tokens. Returns {"samples/i": prompt + completion}.
  """

  def __init__(self, cfg, model, tokenizer):
    t, context = cfg.train, cfg.data.seq_len
    self.sampler = Sampler.for_model(model, context, tokenizer)
    self.requests = [SamplingParams(max_new_tokens=t.sample_tokens, temperature=t.sample_temperature, seed=t.seed)]
    self.requests *= len(t.sample_prompts)
    self.prompts = [encode_prompt(tokenizer, p, context, t.sample_tokens, "left") for p in t.sample_prompts]

  def __call__(self, params) -> dict[str, str]:
    generations = self.sampler.generate(params, self.prompts, self.requests)
    decode = self.sampler.tokenizer.decode
    return {f"samples/{i}": decode(p) + g.text for i, (p, g) in enumerate(zip(self.prompts, generations, strict=True))}
