"""`lm sample`: completes a prompt with the newest checkpoint of a run, streaming the text or printing JSON.

The engine is `lm.sampling`; this module opens the run (`lm.workdir.load_params`) and prints. `lm chat`
(`lm.chat_cli`) shares its pieces: the decoding flags as requests, a run's sampler, the streaming printer
and tokens as JSON.
"""

import dataclasses
import json
import sys
from collections.abc import Iterator

from lm import state
from lm import workdir as workdir_lib
from lm.errors import UserError
from lm.sampling import Generation, Progress, Sampler, SamplingParams, encode_prompt, finish, token_texts


def _shown(text: str, request: SamplingParams, final: bool) -> str:
  """The part of a row's text that is safe to print: not a partial UTF-8 character or stop string."""
  if final:
    return text
  text = text.rstrip("\ufffd")
  held = max((k for s in request.stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
  return text[: len(text) - held]


def requests_from_flags(args, context: int, stop_tokens: tuple[int, ...] = ()) -> list[SamplingParams]:
  """The decoding flags (`lm.cli.add_decoding_flags`) -> one checked request per sample, sample i with seed
  `--seed` + i; `stop_tokens` are ids that end a sample besides EOS. `context` is the run's (data.seq_len)."""
  if args.num_samples < 1:
    raise UserError(f"num_samples must be at least 1, got {args.num_samples}")
  base = SamplingParams(
    max_new_tokens=min(128, context // 2) if args.max_new_tokens is None else args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    min_p=args.min_p,
    repetition_penalty=args.repetition_penalty,
    frequency_penalty=args.frequency_penalty,
    stop_tokens=tuple(stop_tokens),
    stop_strings=tuple(args.stop),
    seed=args.seed,
  )
  requests = [dataclasses.replace(base, seed=args.seed + i) for i in range(args.num_samples)]
  for r in requests:
    r.validate(context)
  return requests


def load_sampler(workdir: str, step: int | None = None) -> tuple[Sampler, dict, state.Setup]:
  """(sampler, params, setup) of the newest checkpoint of a run (or checkpoint `step`): a sampler of its model with
  its context (data.seq_len) and tokenizer. Sample inside `setup.context()`, so the params' sharding is the run's."""
  cfg, tok, setup, params = workdir_lib.load_params(workdir, step)
  return Sampler.for_model(setup.model, cfg.data.seq_len, tok), params, setup


def token_records(tok, generation: Generation) -> list[dict]:
  """A generation's tokens as JSON: [{"id", "text" (its share of the text), "logprob"}]."""
  pieces = token_texts(tok, generation.tokens, generation.text)
  return [
    {"id": t, "text": piece, "logprob": lp}
    for t, piece, lp in zip(generation.tokens, pieces, generation.logprobs, strict=True)
  ]


def main(args) -> None:
  """`lm sample`: completes a prompt from the newest checkpoint of a run, streaming text to stdout."""
  cfg, tok = workdir_lib.load_run(args.workdir)
  context = cfg.data.seq_len
  if args.prompt_file is not None:
    try:
      with open(args.prompt_file, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read prompt file {args.prompt_file}: {getattr(e, 'strerror', None) or e}") from None
  else:
    text = args.prompt
  requests = requests_from_flags(args, context)
  ids = encode_prompt(tok, text, context, requests[0].max_new_tokens, args.truncate)
  sampler, params, setup = load_sampler(args.workdir)
  prompts = [ids] * len(requests)
  with setup.context():
    if args.json:
      generations = sampler.generate(params, prompts, requests)
      samples = [
        {"text": g.text, "finish_reason": g.finish_reason, "seed": r.seed, "tokens": token_records(tok, g)}
        for r, g in zip(requests, generations, strict=True)
      ]
      truncated = ids[0] != tok.bos_id  # cutting a prompt drops its BOS
      record = {"prompt": tok.decode(ids), "prompt_tokens": len(ids), "truncated": truncated, "samples": samples}
      print(json.dumps(record))
      return
    print_stream(sampler.stream(params, prompts, requests), tok, tok.decode(ids), requests)


def print_stream(progress: Iterator[Progress], tok, prompt: str, requests: list[SamplingParams]) -> Progress:
  """Prints each sample (prompt, then completion, then a newline) as its tokens arrive, one sample after
  another, with a header line each if there are several; returns the last progress (every row finished)."""
  out, current, printed = sys.stdout, 0, ""

  def start(i):
    if len(requests) > 1:
      out.write(f"=== sample {i + 1} of {len(requests)} (seed {requests[i].seed}) ===\n")
    out.write(prompt)

  start(0)
  for p in progress:
    while current < len(requests):
      final = p.finished[current] or all(p.finished)
      r = requests[current]
      text = _shown(finish(tok, r, p.tokens[current], p.logprobs[current], tok.eos_id).text, r, final)
      out.write(text[len(printed) :])
      printed = text
      if not final:
        break
      out.write("\n")
      current, printed = current + 1, ""
      if current < len(requests):
        start(current)
    out.flush()
  return p
