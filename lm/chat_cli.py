"""`lm chat`: talks to a run with the chat template (`lm.chat`), in the terminal or once as JSON.

Interactive (no `--messages`): each line read from stdin is a user message; the conversation so far
(`--system` first, if given) is rendered with a generation prompt, the reply is sampled from the run's
newest checkpoint and streamed to stdout as `lm sample` streams, ending at the end-of-turn token, and it
joins the conversation. Turn k (from 0) samples with seed `--seed` + k. An empty line is skipped; EOF
(Ctrl-D) or the line `/exit` ends the session.

One-shot (`--messages F`, or `-` for stdin): the file holds a JSON list of messages ending with a user
or tool message; the reply is streamed as text, or with `--json` printed as one JSON line per sample:
`{"reply", "finish_reason", "tokens", "seed", "prompt_tokens", "dropped_messages", "logprobs"}`, where
finish_reason is "end_of_turn" (the model ended its turn: `<|end|>` or EOS), "length"
(`--max-new-tokens` reached) or "stop" (a `--stop` string), tokens is the reply's token count and
logprobs its tokens as `lm sample --json` gives them. Sample i uses seed `--seed` + i.

With `--tool NAME=KIND:ARG` (repeatable; `lm.tools`), a reply that calls an offered tool (`NAME(ARGUMENT)`)
is followed by the tool's result, shown as `[NAME] RESULT`, and the assistant continues with it in context,
up to `--max-tool-calls` calls a reply (each sub-turn samples with the next seed); `--json` records them as
`"tool_calls": [{"call", "result"}]`. Tools take one sample (`--num-samples 1`).

Both modes take every decoding flag of `lm sample`. A conversation that leaves less than
`--max-new-tokens` of the context (data.seq_len) loses its oldest turns (a user message and what follows
it, up to the next one) after the leading system messages, with a notice on stderr; a last turn too long
on its own is an error (one-shot) or skipped with a notice (interactive).
"""

import dataclasses
import json
import sys

from lm import chat, sample_cli, tools
from lm import workdir as workdir_lib
from lm.errors import UserError
from lm.sampling import SamplingParams, finish
from lm.tokenizer import Tokenizer

EXIT = "/exit"


def fit(tok: Tokenizer, messages: list[dict], context: int, max_new_tokens: int) -> tuple[list[int], int]:
  """(prompt ids, k): the ids of `messages` with a generation prompt, after dropping their first k messages
  after the leading system ones, whole turns, the fewest that leave `max_new_tokens` of `context`.

  A turn starts at a user message; the last one is always kept. UserError if it does not fit on its own.
  """
  room = context - max_new_tokens
  system = next((j for j, m in enumerate(messages) if m["role"] != "system"), len(messages))
  starts = [system] + [j for j in range(system + 1, len(messages)) if messages[j]["role"] == "user"]
  for start in starts:
    ids, _ = chat.render(tok, messages[:system] + messages[start:], generation_prompt=True)
    if len(ids) <= room:
      return ids, start - system
  raise UserError(
    f"the last turn ({len(ids)} tokens with the system prompt) leaves no room for max_new_tokens ({max_new_tokens}) "
    f"in the context of {context} tokens"
  )


def _dropped_notice(k: int, context: int, max_new_tokens: int) -> None:
  print(
    f"lm chat: dropped the oldest {k} message{'s' * (k != 1)} to fit the context of {context} tokens "
    f"({max_new_tokens} kept for the reply)",
    file=sys.stderr,
  )


def finish_reason(tok: Tokenizer, request: SamplingParams, tokens: list[int], logprobs: list[float]) -> str:
  """ "end_of_turn", "length" or "stop" (a stop string) for a row's raw tokens (see the module docstring)."""
  ended = finish(tok, dataclasses.replace(request, stop_strings=()), tokens, logprobs, tok.eos_id)
  if any(s in ended.text for s in request.stop_strings):
    return "stop"
  return "end_of_turn" if ended.finish_reason == "stop" else "length"


def read_messages(path: str) -> list[dict]:
  """The conversation in the JSON file `path` ("-": stdin), checked: it must end with a user or tool message."""
  where = "stdin" if path == "-" else path
  try:
    if path == "-":
      text = sys.stdin.read()
    else:
      with open(path, encoding="utf-8") as f:
        text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read --messages {where}: {getattr(e, 'strerror', None) or e}") from None
  try:
    messages = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"--messages {where} is not JSON: {e}") from None
  try:
    chat.check(messages, need_assistant=False)
  except UserError as e:
    raise UserError(f"--messages {where}: {e}") from None
  if messages[-1]["role"] not in ("user", "tool"):
    raise UserError(
      f"--messages {where}: the last message is from the {messages[-1]['role']}; a reply follows a user or tool message"
    )
  return messages


def main(args) -> None:
  """`lm chat` (see the module docstring)."""
  cfg, tok = workdir_lib.load_run(args.workdir)
  context = cfg.data.seq_len
  requests = sample_cli.requests_from_flags(args, context, chat.stop_tokens(tok))
  system = [] if args.system is None else [{"role": "system", "content": args.system}]
  tool_fns = tools.make_tools(args.tool)
  if tool_fns and len(requests) > 1:
    raise UserError("--tool takes one sample (--num-samples 1): each sample would call tools of its own")
  if args.max_tool_calls < 0:
    raise UserError(f"--max-tool-calls must be at least 0, got {args.max_tool_calls}")
  if args.messages is None:
    if args.json:
      raise UserError("--json needs --messages (an interactive session prints text)")
    if len(requests) > 1:
      raise UserError("--num-samples needs --messages (an interactive session keeps one reply per turn)")
    _interactive(args.workdir, tok, context, requests[0], system, tool_fns, args.max_tool_calls)
    return
  messages = read_messages(args.messages)
  if system and messages[0]["role"] == "system":
    raise UserError(f"--system and a system message in --messages {args.messages}: give one")
  ids, dropped = fit(tok, system + messages, context, requests[0].max_new_tokens)
  if dropped:
    _dropped_notice(dropped, context, requests[0].max_new_tokens)
  sampler, params, setup = sample_cli.load_sampler(args.workdir)
  if tool_fns:
    reply, calls, _ = _reply_with_tools(
      (sampler, params, setup),
      tok,
      context,
      system + messages,
      requests[0],
      tool_fns,
      args.max_tool_calls,
      not args.json,
    )
    if args.json:
      print(json.dumps({"reply": reply.text, "finish_reason": reply.finish_reason, "tool_calls": calls}))
    return
  prompts = [ids] * len(requests)
  with setup.context():
    if not args.json:
      sample_cli.print_stream(sampler.stream(params, prompts, requests), tok, "", requests)
      return
    longest = requests[0].max_new_tokens
    *_, last = sampler.stream(params, prompts, requests, first_chunk=longest, chunk=longest)  # as generate() runs
  for i, r in enumerate(requests):
    g = finish(tok, r, last.tokens[i], last.logprobs[i], tok.eos_id)
    record = {
      "reply": g.text,
      "finish_reason": finish_reason(tok, r, last.tokens[i], last.logprobs[i]),
      "tokens": len(g.tokens),
      "seed": r.seed,
      "prompt_tokens": len(ids),
      "dropped_messages": dropped,
      "logprobs": sample_cli.token_records(tok, g),
    }
    print(json.dumps(record))


def _reply_with_tools(loaded, tok, context, messages, request, tool_fns, max_calls, show: bool):
  """(the final reply's Generation, [{"call", "result"}], the messages added) of one assistant reply that may
  call tools: each sub-turn is sampled (streamed if `show`), a call runs and its result joins the context."""
  sampler, params, setup = loaded
  calls, added = [], []
  for k in range(max_calls + 1):
    try:
      ids, _ = fit(tok, messages + added, context, request.max_new_tokens)
    except UserError:  # a tool's result filled the context: the sub-turn gets the room that is left
      ids, _ = fit(tok, messages + added, context, 1)
    r = dataclasses.replace(
      request, seed=request.seed + k, max_new_tokens=min(request.max_new_tokens, context - len(ids))
    )
    with setup.context():
      if show:
        last = sample_cli.print_stream(sampler.stream(params, [ids], [r]), tok, "", [r])
      else:
        *_, last = sampler.stream(params, [ids], [r], first_chunk=r.max_new_tokens, chunk=r.max_new_tokens)
    reply = finish(tok, r, last.tokens[0], last.logprobs[0], tok.eos_id)
    call = tools.parse_call(reply.text, tool_fns) if k < max_calls else None
    added.append({"role": "assistant", "content": reply.text})
    if call is None:
      return (
        dataclasses.replace(reply, finish_reason=finish_reason(tok, r, last.tokens[0], last.logprobs[0])),
        calls,
        added,
      )
    name, argument = call
    result = tool_fns[name](argument) if name else argument
    if show:
      print(f"[{name or 'tool'}] {result}", flush=True)
    calls.append({"call": reply.text, "result": result})
    added.append({"role": "tool", "content": result})
  raise AssertionError("unreachable: the last sub-turn never calls")


def _interactive(
  workdir: str, tok: Tokenizer, context: int, request: SamplingParams, system: list[dict], tool_fns=None, max_calls=0
) -> None:
  """Reads user lines from stdin until EOF or /exit, streaming each reply to stdout (see the module docstring)."""
  sampler, params, setup = sample_cli.load_sampler(workdir)
  tty = sys.stdin.isatty()
  if tty:
    print(f"lm chat: {workdir}; {EXIT} or Ctrl-D ends", file=sys.stderr)
  history, turn = list(system), 0
  while True:
    if tty:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line or line.strip() == EXIT:
      return
    if not line.strip():
      continue
    candidate = [*history, {"role": "user", "content": line.rstrip("\n")}]
    try:
      ids, dropped = fit(tok, candidate, context, request.max_new_tokens)
    except UserError as e:
      print(f"lm chat: message skipped: {e}", file=sys.stderr)
      continue
    if dropped:
      _dropped_notice(dropped, context, request.max_new_tokens)
      candidate = candidate[: len(system)] + candidate[len(system) + dropped :]
    r = dataclasses.replace(request, seed=request.seed + turn)
    if tool_fns:
      _, calls, added = _reply_with_tools(
        (sampler, params, setup), tok, context, candidate, r, tool_fns, max_calls, True
      )
      history = [*candidate, *added]
      turn += 1 + len(calls)
      continue
    with setup.context():
      last = sample_cli.print_stream(sampler.stream(params, [ids], [r]), tok, "", [r])
    reply = finish(tok, r, last.tokens[0], last.logprobs[0], tok.eos_id)
    history = [*candidate, {"role": "assistant", "content": reply.text}]
    turn += 1
