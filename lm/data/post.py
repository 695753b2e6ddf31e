"""Post-training data: conversations for supervised fine-tuning (SFT), preference pairs for reward models and DPO.

Sources are `jsonl:GLOB` (one record per line; files in sorted order) or an already-prepared
`tfds:NAME[/CONFIG][:VERSION][:SPLIT]` dataset (split 'train' by default), read as
`lm.data.sources` reads them. A record is
- a conversation: `{"messages": [{"role": ROLE, "content": TEXT}, ...]}`, roles as in `lm.chat`;
- a preference pair, in TRL's "standard" or "conversational" form:
  `{"prompt": P, "chosen": C, "rejected": R}` with P a string (one user message) or a list of
  messages, and C, R strings (one assistant reply each) or lists of messages continuing P; or
  `{"chosen": C, "rejected": R}` with C and R whole conversations whose last message is the
  assistant reply, and everything before it the prompt, the same in both.
  An optional `"margin"` (a number, 0 when absent) says how much better C is than R.
A TFDS dataset holds the same fields as features: a `messages` Sequence of {role, content} Text
features, `prompt`/`chosen`/`rejected` Text features or such Sequences, `margin` a float Scalar.
Every bad record is a one-line UserError naming it by `PATH:LINE` (or `SOURCE record I`).

Held-out data is a separate eval source, or a fraction of the records chosen by a hash of each
record's identity (`lm.data.corpus_builder.unit_hash`, as the pre-training hash split): its `id` if
it has one, else its messages (a conversation) or its prompt (a pair: pairs sharing a prompt stay
together). The choice of a record depends on that record alone.

Datasets are small: every process reads and tokenizes all records and holds them in memory.
An example longer than seq_len + 1 ids (a row: `seq_len` inputs and targets) is, as `overlong`
says, cut to its first seq_len + 1 ids (`truncate`, counted in `Dataset.truncated`), left out
(`drop`, counted in `Dataset.dropped`) or an error (`error`). An example left with no loss token
(a pair whose response was cut off entirely) is dropped and counted too.

Batches are in the one batch format (`lm.data.pipeline`: `inputs`, `targets`, `segment_ids`,
`positions`, `loss_mask`, each [B, T]), B rows of this process:
- SFT: each epoch, the examples in a new random order are packed whole into rows of T + 1 ids (a
  row takes examples until the next does not fit), each example a segment (segment_ids 1, 2, ...,
  0 for padding; positions restart at 0). `loss_mask` is `lm.chat.render`'s mask of the targets:
  1 on the assistant tokens `loss_on` chooses.
- Preference: a global batch of P pairs is 2P rows, one sequence per row (no packing, padded):
  row 2i is pair i's chosen conversation and row 2i + 1 its rejected one, both rendered from the
  same prompt. `loss_mask` is 1 on the response's targets only (the assistant reply ids and their
  `<|end|>`). One more key, `margin`: float32 [B], the pair's margin on both of its rows, and, once
  a DPO run has set its examples' `ref_logps` (reference log-probs computed before training), a key
  `ref_logps`: float32 [B], each row's.
  The DPO and reward-model losses take a row's sequence log-probability as
  sum(logp(targets) * loss_mask), its reward at its last real token (the last position where
  segment_ids > 0), and pair rows 0::2 (chosen) with rows 1::2 (rejected). A padding row (eval's
  last batch) has segment_ids 0 everywhere: its pair is no pair and must weigh nothing.
A process holds a contiguous block of each global batch (`pipeline.RowsIterator`), whole pairs
(its row count must be even), so the global batches do not depend on the process count. The
iterator's state is the batches read, {"batches": n}, for an exact resume.
"""

import bisect
import dataclasses
import json

import numpy as np

from lm import chat
from lm.data import corpus_builder, pipeline, sources, tokens
from lm.errors import UserError
from lm.tokenizer import Tokenizer

KINDS = ("sft", "preference", "prompt")
OVERLONG = ("truncate", "drop", "error")
USAGE = "jsonl:GLOB or tfds:NAME[/CONFIG][:VERSION][:SPLIT]"


@dataclasses.dataclass(frozen=True)
class Record:
  """One record of a source: its place (named by errors) and its JSON-like value."""

  where: str  # PATH:LINE, or SOURCE record I
  value: object


@dataclasses.dataclass
class Prompt:
  """A prompt to answer (reinforcement learning): messages ending before an assistant turn, and the record's
  other fields (`metadata`), which a reward function reads (`rl.reward_fn`)."""

  prompt: list[dict]
  metadata: dict


@dataclasses.dataclass
class Pair:
  """A preference pair: two responses (lists of messages, ending with an assistant turn) to one prompt."""

  prompt: list[dict]
  chosen: list[dict]
  rejected: list[dict]
  margin: float = 0.0


@dataclasses.dataclass
class Example:
  """A tokenized example: (ids int32, per-id loss mask float32) of a conversation, or of a pair's chosen, rejected."""

  sequences: list[tuple[np.ndarray, np.ndarray]]
  margin: float = 0.0
  ref_logps: tuple[float, ...] | None = None  # a pair's (chosen, rejected) log-probs under a DPO reference


@dataclasses.dataclass
class Dataset:
  """The tokenized examples of a split, each at most seq_len + 1 ids, and how many were cut or left out."""

  kind: str  # sft | preference
  seq_len: int
  examples: list[Example]
  truncated: int = 0  # over-long examples cut to seq_len + 1 ids and kept
  dropped: int = 0  # examples left out: over-long with overlong=drop, or with no loss token left

  def metrics(self, prefix: str = "data/") -> dict[str, int]:
    """{PREFIX examples, truncated, dropped}, for the run's metrics."""
    counts = {"examples": len(self.examples), "truncated": self.truncated, "dropped": self.dropped}
    return {prefix + k: v for k, v in counts.items()}


def read_records(cfg, source: str) -> list[Record]:
  """The records of a `jsonl:` or `tfds:` source; `cfg` says where TFDS datasets live (`data.cache_dir`)."""
  kind, _, arg = source.partition(":")
  if kind not in ("jsonl", "tfds") or not arg:
    raise UserError(f"post-training data source {source!r} must be {USAGE}")
  if kind == "jsonl":
    return [Record(where, value) for where, value in sources.jsonl_records(sources.list_files(source))]
  builder, split = sources.open_tfds(pipeline.source_config(cfg, source))
  try:
    examples = builder.as_data_source(split=split or "train")
  except (ValueError, KeyError) as e:
    raise UserError(f"TFDS dataset {builder.info.full_name} has no split {split or 'train'!r}: {e}") from None
  return [Record(f"{source} record {i}", tfds_value(examples[i])) for i in range(len(examples))]


def tfds_value(example: dict) -> dict:
  """A TFDS example as JSON-like values: text as str, a Sequence of dicts (read as dict of lists) as a list of dicts."""

  def plain(value):
    if isinstance(value, np.ndarray | np.generic):
      return plain(value.tolist())
    if isinstance(value, bytes):
      return value.decode("utf-8", errors="replace")
    if isinstance(value, list | tuple):
      return [plain(v) for v in value]
    if isinstance(value, dict):
      value = {k: plain(v) for k, v in value.items()}
      columns = list(value.values())
      if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
        return [dict(zip(value, row, strict=True)) for row in zip(*columns, strict=True)]
    return value

  return {key: plain(value) for key, value in example.items()}


def conversation(record: Record) -> list[dict]:
  """The messages of a conversation record, checked (`lm.chat.check`)."""
  value = record.value
  if not isinstance(value, dict) or "messages" not in value:
    raise UserError(f"{record.where}: missing key 'messages' (a conversation record is {{\"messages\": [...]}})")
  try:
    chat.check(value["messages"])
  except UserError as e:
    raise UserError(f"{record.where}: {e}") from None
  return value["messages"]


def pair(record: Record) -> Pair:
  """The preference pair of a record (see the module docstring for its forms), checked."""
  value = record.value
  try:
    if not isinstance(value, dict):
      raise UserError(f"expected an object with 'chosen' and 'rejected', got {type(value).__name__}")
    for key in ("chosen", "rejected"):
      if key not in value:
        raise UserError(f"missing key {key!r}")
    margin = value.get("margin")
    if margin is None:
      margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, int | float):
      raise UserError(f"margin is not a number: {margin!r}")
    if "prompt" in value:
      prompt = value["prompt"]
      prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
      _check("prompt", prompt, need_assistant=False)
      chosen, rejected = (_response(key, value[key]) for key in ("chosen", "rejected"))
    else:
      for key in ("chosen", "rejected"):
        if not isinstance(value[key], list):
          raise UserError(f"missing key 'prompt' ({key} is not a whole conversation)")
        _check(key, value[key])
        if value[key][-1]["role"] != "assistant":
          raise UserError(f"{key} does not end with an assistant turn")
      prompt, chosen, rejected = value["chosen"][:-1], value["chosen"][-1:], value["rejected"][-1:]
      if _turns(prompt) != _turns(value["rejected"][:-1]):
        raise UserError("chosen and rejected have different prompts (the messages before their last turn)")
      if not prompt:
        raise UserError("chosen and rejected hold no prompt before their reply")
  except UserError as e:
    raise UserError(f"{record.where}: {e}") from None
  return Pair(prompt, chosen, rejected, float(margin))


def prompt(record: Record) -> Prompt:
  """The prompt of a record: `{"prompt": P, ...}` (P a string, one user message, or a list of messages), or a
  conversation `{"messages": [...]}` up to its last assistant turn, whose content becomes metadata["reference"].
  The record's other fields are the metadata."""
  value = record.value
  try:
    if not isinstance(value, dict) or ("prompt" not in value and "messages" not in value):
      raise UserError('a prompt record is {"prompt": ...} or a conversation {"messages": [...]}')
    metadata = {k: v for k, v in value.items() if k not in ("prompt", "messages")}
    if "prompt" in value:
      messages = value["prompt"]
      messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
      _check("prompt", messages, need_assistant=False)
    else:
      _check("messages", value["messages"], need_assistant=False)
      messages = value["messages"]
      if messages[-1]["role"] == "assistant":
        messages, metadata = messages[:-1], {**metadata, "reference": messages[-1]["content"]}
    if not messages or messages[-1]["role"] == "assistant":
      raise UserError("the prompt must end with a message the assistant answers (not an assistant turn)")
  except UserError as e:
    raise UserError(f"{record.where}: {e}") from None
  return Prompt(messages, metadata)


def _check(key: str, messages, need_assistant: bool = True) -> None:
  try:
    chat.check(messages, need_assistant)
  except UserError as e:
    raise UserError(f"{key}: {e}") from None


def _response(key: str, value) -> list[dict]:
  """A pair's chosen or rejected continuation of its prompt: a string is one assistant message."""
  messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
  _check(key, messages)
  return messages


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
  return [(m["role"], m["content"]) for m in messages]


def identity(record: Record, item) -> str:
  """The identity the hash split reads: the record's `id`, else a hash of its messages or of a pair's prompt."""
  given = record.value.get("id") if isinstance(record.value, dict) else None
  if given is not None:
    return f"id:{given}"
  turns = _turns(item.prompt if isinstance(item, Pair | Prompt) else item)
  return sources.text_identity(json.dumps(turns))


def split(records: list[Record], items: list, eval_fraction: float) -> tuple[list[int], list[int]]:
  """(train, eval) indices of `records`: eval holds those whose identity hashes below `eval_fraction`, at least one."""
  if not eval_fraction:
    return list(range(len(records))), []
  hashes = np.array([corpus_builder.unit_hash(identity(r, x)) for r, x in zip(records, items, strict=True)])
  held = corpus_builder.held_out(hashes, eval_fraction)
  if held.all():
    raise UserError(f"{len(records)} post-training records are too few to hold out eval_fraction={eval_fraction}")
  return [int(i) for i in np.flatnonzero(~held)], [int(i) for i in np.flatnonzero(held)]


def tokenize(
  tok: Tokenizer,
  records: list[Record],
  items: list,
  kind: str,
  seq_len: int,
  loss_on: str = "assistant",
  overlong: str = "truncate",
) -> Dataset:
  """The Dataset of the parsed `items` (conversations or Pairs) of `records`; over-long ones as `overlong` says."""
  if overlong not in OVERLONG:
    raise UserError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
  data, limit = Dataset(kind, seq_len, []), seq_len + 1
  for record, item in zip(records, items, strict=True):
    if kind == "sft":
      sequences = [chat.render(tok, item, loss_on)]
    else:
      sequences = [chat.render_continuation(tok, item.prompt, response) for response in (item.chosen, item.rejected)]
    longest = max(len(ids) for ids, _ in sequences)
    if longest > limit and overlong == "error":
      noun = "conversation" if kind == "sft" else "pair's longer sequence"
      raise UserError(
        f"{record.where}: the {noun} is {longest} tokens, more than seq_len + 1 = {limit} (overlong=error)"
      )
    if longest > limit and overlong == "drop":
      data.dropped += 1
      continue
    sequences = [(np.array(ids[:limit], np.int32), np.array(mask[:limit], np.float32)) for ids, mask in sequences]
    if not all(mask[1:].any() for _, mask in sequences):
      data.dropped += 1
      continue
    data.truncated += int(longest > limit)
    data.examples.append(Example(sequences, item.margin if kind == "preference" else 0.0))
  return data


@dataclasses.dataclass
class Parsed:
  """The checked records of a source and their parsed items (conversations or Pairs), split into train and eval."""

  kind: str
  train: tuple[list[Record], list]
  eval: tuple[list[Record], list]


def parse(cfg, source: str, kind: str, eval_fraction: float = 0.0, eval_source: str = "") -> Parsed:
  """The records of `kind` from `source`, each checked (a bad one is a UserError naming it), split into train and
  eval: eval from `eval_source` if given, else the hash split (empty without `eval_fraction`)."""
  if kind not in KINDS:
    raise UserError(f"post-training data kind must be one of {', '.join(KINDS)}, got {kind!r}")
  read = {"sft": conversation, "preference": pair, "prompt": prompt}[kind]
  records = read_records(cfg, source)
  if not records:
    raise UserError(f"post-training data source {source!r} holds no records")
  items = [read(r) for r in records]
  if eval_source:
    eval_records = read_records(cfg, eval_source)
    return Parsed(kind, (records, items), (eval_records, [read(r) for r in eval_records]))
  train, held = split(records, items, eval_fraction)
  return Parsed(kind, *(([records[i] for i in part], [items[i] for i in part]) for part in (train, held)))


def tokenize_parsed(
  tok: Tokenizer, parsed: Parsed, seq_len: int, loss_on: str = "assistant", overlong: str = "truncate"
) -> tuple[Dataset, Dataset | None]:
  """(train, eval) Datasets of `parse`'s records; eval None if there are no eval records."""
  train = tokenize(tok, *parsed.train, parsed.kind, seq_len, loss_on, overlong)
  if not parsed.eval[0]:
    return train, None
  return train, tokenize(tok, *parsed.eval, parsed.kind, seq_len, loss_on, overlong)


def load(
  cfg,
  tok: Tokenizer,
  source: str,
  kind: str,
  seq_len: int,
  loss_on: str = "assistant",
  overlong: str = "truncate",
  eval_fraction: float = 0.0,
  eval_source: str = "",
) -> tuple[Dataset, Dataset | None]:
  """(train, eval) Datasets of `kind` from `source`: eval from `eval_source` if given, else the hash split or None."""
  return tokenize_parsed(tok, parse(cfg, source, kind, eval_fraction, eval_source), seq_len, loss_on, overlong)


def pack(sequences: list[tuple[np.ndarray, np.ndarray]], length: int) -> dict:
  """One row of `length` ids holding `sequences` one after the other, padded: {tokens, segment_ids, positions,
  loss_mask}, each [length]; the mask is per id (the target mask is its [1:])."""
  row = {k: np.zeros(length, np.int32) for k in ("tokens", "segment_ids", "positions")}
  row["loss_mask"] = np.zeros(length, np.float32)
  start = 0
  for segment, (ids, mask) in enumerate(sequences, 1):
    end = start + len(ids)
    assert end <= length, (end, length)
    row["tokens"][start:end], row["loss_mask"][start:end] = ids, mask
    row["segment_ids"][start:end], row["positions"][start:end] = segment, np.arange(len(ids))
    start = end
  return row


def pack_rows(examples: list[Example], length: int) -> list[list[Example]]:
  """The SFT examples, in order, cut into rows: a row takes examples while the next one fits in `length` ids."""
  rows, row, filled = [], [], 0
  for example in examples:
    size = len(example.sequences[0][0])
    if row and filled + size > length:
      rows.append(row)
      row, filled = [], 0
    row.append(example)
    filled += size
  return rows + [row] if row else rows


class PackedRows:
  """The endless rows of an SFT Dataset: epoch e packs all examples, in epoch e's random order, into rows."""

  def __init__(self, data: Dataset, seed: int):
    self.data, self.length = data, data.seq_len + 1
    self.order = tokens.shuffled(data.examples, seed)  # examples in a new order each epoch
    self.starts = [0]  # starts[e]: the first row of epoch e, for the epochs packed so far
    self.epoch, self.rows = -1, []  # the epoch last packed and its rows

  def _pack(self, epoch: int) -> list[list[Example]]:
    n = len(self.data.examples)
    if epoch != self.epoch:
      self.epoch, self.rows = epoch, pack_rows([self.order[epoch * n + i] for i in range(n)], self.length)
    return self.rows

  def __getitem__(self, r: int) -> dict:
    while r >= self.starts[-1]:
      self.starts.append(self.starts[-1] + len(self._pack(len(self.starts) - 1)))
    epoch = bisect.bisect_right(self.starts, r) - 1
    return pack([e.sequences[0] for e in self._pack(epoch)[r - self.starts[epoch]]], self.length)


class PairRows:
  """The endless rows of a preference Dataset: 2i and 2i + 1 the chosen and rejected of the i-th pair (a new order
  each epoch), one sequence per row, with the pair's `margin`."""

  def __init__(self, data: Dataset, seed: int):
    self.length = data.seq_len + 1
    self.pairs = tokens.shuffled(data.examples, seed)

  def __getitem__(self, r: int) -> dict:
    return pair_row(self.pairs[r // 2], r % 2, self.length)


def pair_row(example: Example, which: int, length: int) -> dict:
  """The row of a pair's chosen (`which` 0) or rejected (1) sequence, with its margin (and reference log-prob)."""
  row = {**pack([example.sequences[which]], length), "margin": np.float32(example.margin)}
  if example.ref_logps is not None:
    row["ref_logps"] = np.float32(example.ref_logps[which])
  return row


def to_batch(rows: dict) -> dict:
  """The batch of stacked rows of `pack`: the pipeline's batch, its loss mask the rows' mask of targets, `margin`
  and `ref_logps` if the rows have them."""
  batch = pipeline.to_batch(rows)
  batch["loss_mask"] = batch["loss_mask"] * rows["loss_mask"][:, 1:]
  for key in ("margin", "ref_logps"):
    if key in rows:
      batch[key] = rows[key].astype(np.float32)
  return batch


def _check_batch(data: Dataset, batch_size: int, process_count: int) -> None:
  if batch_size % process_count:
    raise UserError(f"the batch size ({batch_size}) must be divisible by the {process_count} processes")
  if data.kind == "preference" and (batch_size // process_count) % 2:
    raise UserError(
      f"a preference batch holds pairs of rows: the batch size ({batch_size}) over {process_count} processes "
      "must be even"
    )


def make_iterator(
  data: Dataset, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> pipeline.RowsIterator:
  """An endless iterator of this process's rows of global batches of `batch_size` rows (see the module docstring).

  Deterministic from `seed`; `get_state()` is {"batches": n} and `set_state` resumes exactly there.
  """
  _check_batch(data, batch_size, process_count)
  if not data.examples:
    raise UserError("no post-training examples to train on (all were dropped, or the source is empty)")
  rows = PackedRows(data, seed) if data.kind == "sft" else PairRows(data, seed)
  return pipeline.RowsIterator(rows, batch_size, process_index, process_count, make_batch=to_batch)


def make_eval_set(
  data: Dataset, batch_size: int, process_index: int = 0, process_count: int = 1, max_batches: int = 0
) -> pipeline.EvalSet:
  """Every example of `data` once, in order (up to `max_batches` batches if > 0): this process's block of batches.

  SFT examples are packed as in training, pairs take two rows each; the last batch is padded with
  empty rows (segment_ids and loss_mask 0, margin and ref_logps 0).
  """
  _check_batch(data, batch_size, process_count)
  if not data.examples:
    raise UserError("no post-training examples to evaluate (all were dropped, or the source is empty)")
  length = data.seq_len + 1
  if data.kind == "sft":
    packed = pack_rows(data.examples, length)[: max_batches * batch_size or None]
    rows, documents = [pack([e.sequences[0] for e in row], length) for row in packed], sum(map(len, packed))
  else:
    pairs = data.examples[: max_batches * batch_size // 2 or None]
    rows, documents = [pair_row(e, which, length) for e in pairs for which in (0, 1)], len(pairs)
  rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (-len(rows) % batch_size)
  local_rows = batch_size // process_count
  block = slice(process_index * local_rows, (process_index + 1) * local_rows)
  local, n_tokens = [], 0
  for lo in range(0, len(rows), batch_size):
    batch = to_batch({k: np.stack([row[k] for row in rows[lo : lo + batch_size]]) for k in rows[0]})
    n_tokens += int(batch["loss_mask"].sum())
    local.append({k: v[block] for k, v in batch.items()})
  return pipeline.EvalSet(local, n_tokens, documents)
