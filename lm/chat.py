"""The chat template: conversations <-> token ids, with the loss mask of supervised fine-tuning.

A conversation is a list of messages `{"role": ROLE, "content": TEXT}`, ROLE one of `ROLES`
(other keys of a message are ignored). It renders as

    <bos> <|role|> content <|end|> <|role|> content <|end|> ...

with no newline or space around the markers: each marker is one special id inserted by id
(`tok.special`), and each content is encoded on its own with `tok.encode`, so text that looks
like a marker ("<|end|>") is ordinary text and never a special id. A generation prompt ends with
`<|assistant|>`; the model then writes the reply and stops with `<|end|>` (`stop_tokens`).
For example `[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]` is
`[<bos>, <|user|>, h, i, <|end|>, <|assistant|>, y, o, <|end|>]`.

The loss mask has one entry per id: `loss_mask[i]` is 1 when predicting `ids[i]` (from ids[:i])
counts. It is the target's mask: in the batch format (`lm.data.pipeline`) where a row of ids gives
`targets = ids[1:]`, the row's `loss_mask` is `loss_mask[1:]`. `loss_mask[0]` (the bos) is 0.
"""

from lm.errors import UserError
from lm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
LOSS_ON = ("assistant", "last", "all")  # every assistant turn | the last assistant turn | every token after bos


def check(messages, need_assistant: bool = True) -> None:
  """Raises a one-line UserError if `messages` is not a conversation (with an assistant turn if `need_assistant`)."""
  if not isinstance(messages, list):
    raise UserError(f"a conversation is a list of messages, got {type(messages).__name__}")
  if not messages:
    raise UserError("the conversation is empty")
  for j, message in enumerate(messages):
    if not isinstance(message, dict):
      raise UserError(f"message {j} is not an object with 'role' and 'content' (got {type(message).__name__})")
    if message.get("role") not in ROLES:
      raise UserError(f"message {j} has unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(message.get("content"), str):
      raise UserError(f"message {j} content is not a string (got {type(message.get('content')).__name__})")
  if need_assistant and not any(m["role"] == "assistant" for m in messages):
    raise UserError("the conversation has no assistant turn")


def special_id(tok: Tokenizer, name: str) -> int:
  """The id of the special token `name`, a UserError if the tokenizer lacks it."""
  if name not in tok.special:
    raise UserError(f"the {tok.kind} tokenizer has no {name} token (load it with its missing specials added)")
  return tok.special[name]


def render(
  tok: Tokenizer, messages: list[dict], loss_on: str = "assistant", generation_prompt: bool = False
) -> tuple[list[int], list[float]]:
  """(ids, loss_mask) of a conversation, as the module docstring lays them out.

  The mask is 1 on the content ids of assistant turns and their `<|end|>` (never on the
  `<|assistant|>` marker, which the prompt supplies): on every assistant turn for
  `loss_on="assistant"`, on the last one for "last", and on every id but the bos for "all".
  With `generation_prompt` the ids end with `<|assistant|>` (masked as the markers are), and the
  conversation needs no assistant turn; without it, "assistant" and "last" need one.
  """
  if loss_on not in LOSS_ON:
    raise UserError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
  check(messages, need_assistant=loss_on != "all" and not generation_prompt)
  last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
  counts = [m["role"] == "assistant" and (loss_on == "assistant" or j == last) for j, m in enumerate(messages)]
  return _render(tok, messages, counts, loss_on == "all", generation_prompt)


def render_continuation(tok: Tokenizer, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[float]]:
  """(ids, loss_mask) of `prompt + response` with the mask on the response's assistant turns only.

  This is a preference row: a reward or a log-probability of the response given the prompt.
  """
  check(prompt, need_assistant=False)
  check(response)
  counts = [False] * len(prompt) + [m["role"] == "assistant" for m in response]
  return _render(tok, prompt + response, counts, False, False)


def _render(
  tok: Tokenizer, messages: list[dict], counts: list[bool], every_id: bool, generation_prompt: bool
) -> tuple[list[int], list[float]]:
  """The ids of `messages`; the mask is 1 on message j's content and <|end|> if counts[j], on all but bos if
  `every_id`."""
  end = special_id(tok, "<|end|>")
  markers = [special_id(tok, f"<|{m['role']}|>") for m in messages]
  contents = tok.encode([m["content"] for m in messages])
  marker_mask = float(every_id)
  ids, mask = [tok.bos_id], [0.0]
  for marker, content, count in zip(markers, contents, counts, strict=True):
    ids += [marker, *content, end]
    mask += [marker_mask] + [float(count or every_id)] * (len(content) + 1)
  if generation_prompt:
    ids.append(special_id(tok, "<|assistant|>"))
    mask.append(marker_mask)
  return ids, mask


def stop_tokens(tok: Tokenizer) -> tuple[int, ...]:
  """The ids that end an assistant reply, for `lm.sampling.SamplingParams.stop_tokens` (eos stops anyway)."""
  return (special_id(tok, "<|end|>"),)


def parse(tok: Tokenizer, ids) -> tuple[dict, bool]:
  """({"role": "assistant", "content": text}, finished) of a completion sampled after a generation prompt.

  `ids` are the generated ids only (not the prompt). The content is the text before the first
  `<|end|>` or `<eos>`; `finished` says whether one came (else the reply was cut off). Any other
  special id inside the reply is written as its name (`Tokenizer.decode`).
  """
  ids = [int(i) for i in ids]
  stops = {*stop_tokens(tok), tok.eos_id}
  cut = next((k for k, i in enumerate(ids) if i in stops), None)
  reply = ids if cut is None else ids[:cut]
  return {"role": "assistant", "content": tok.decode(reply)}, cut is not None
