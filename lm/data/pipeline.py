"""grain pipelines that turn the prepared corpus into packed batches of token ids.

Every batch is a dict of numpy arrays of shape [B_local, T], T = data.seq_len:
  inputs, targets: int32 ids; targets are inputs shifted by one within a packed row of T+1 tokens.
  segment_ids: int32, 1.. per document piece in the row, 0 for padding.
  positions: int32, restarting at 0 for each segment.
  loss_mask: float32, 1 where the target is a token of the input's own document.
Each document is tokenized as [BOS] + ids + [EOS]. A row may start or end mid-document.
"""

import dataclasses

import grain
import jax
import numpy as np

from lm import config as config_lib
from lm.data import corpus_builder, tokens
from lm.errors import UserError
from lm.tokenizer import Tokenizer

EVAL_SEED = 0  # the eval documents' order: the same for every run, whatever its train.seed


def make_train_iterator(cfg, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1):
  """An endless, resumable iterator of this process's training batches, as `data.shuffle` says."""
  if cfg.data.shuffle == "global":
    return make_global_iterator(cfg, tokenizer, process_index, process_count)
  return make_window_iterator(cfg, tokenizer, process_index, process_count)


def make_global_iterator(cfg, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1):
  """Batches of the train split's rows in a new random order every epoch (see `lm.data.tokens`).

  Global batch b holds shuffled rows [b * B, (b + 1) * B); a process reads its contiguous block
  of them, so the batches do not depend on the process count.
  """
  if cfg.train.batch_size % process_count:
    raise UserError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the {process_count} processes")
  rows = tokens.Rows(tokens.token_file(cfg, tokenizer, "train"), cfg.data.seq_len)
  if len(rows) < cfg.train.batch_size:
    raise UserError(
      f"the train split holds {len(rows)} rows of data.seq_len={cfg.data.seq_len} tokens, fewer than one "
      f"batch of train.batch_size={cfg.train.batch_size}"
    )
  return RowsIterator(tokens.shuffled(rows, cfg.train.seed), cfg.train.batch_size, process_index, process_count)


class RowsIterator:
  """This process's rows of each global batch of an endless row dataset; its state is the batches read.

  The rows (dicts of arrays) are stacked and turned into a batch by `make_batch` (default `to_batch`).
  """

  def __init__(self, rows, batch_size: int, process_index: int, process_count: int, make_batch=None):
    self.rows, self.batch_size, self.batches = rows, batch_size, 0
    self.make_batch = make_batch or to_batch
    self.local = batch_size // process_count
    self.first = process_index * self.local

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = self.batches * self.batch_size + self.first
    rows = [self.rows[start + i] for i in range(self.local)]
    self.batches += 1
    return self.make_batch({k: np.stack([row[k] for row in rows]) for k in rows[0]})

  def get_state(self) -> dict:
    return {"batches": self.batches}

  def set_state(self, state: dict) -> None:
    if "batches" not in state:
      raise UserError("the checkpoint holds a data position of the streamed pipeline (data.shuffle=window)")
    self.batches = int(state["batches"])


def make_window_iterator(cfg, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1):
  """Streamed batches: documents shuffled, tokenized and packed on the fly, rows shuffled in a window.

  The train split is read as `data.shards` shards (fixed for the life of a run): shard s holds
  records s::shards, reshuffled every epoch from `train.seed`, and fills rows
  [s * B / shards, (s + 1) * B / shards) of every global batch of B rows. A process reads only
  its own contiguous block of shards, so the global batch is the same for any process count that
  divides `data.shards`, and a checkpoint moves between such counts.
  `get_state()` is JSON-serializable: {"shards": {"s": state}} for this process's shards;
  `set_state` takes any dict holding them (for instance every shard's, from a checkpoint).
  """
  records = grain.MapDataset.source(corpus_builder.prepare(cfg)["train"])
  shards = cfg.data.shards or process_count
  if len(records) < shards:
    raise UserError(
      f"the train split has {len(records)} documents, fewer than data.shards ({shards}), so some shards would be "
      "empty; split the source into more files or use fewer shards"
    )
  if shards % process_count:
    raise UserError(
      f"this run reads its data as data.shards={shards} shards, which {process_count} processes cannot split "
      "evenly; use a process count that divides it"
    )
  mine = range(process_index * shards // process_count, (process_index + 1) * shards // process_count)
  rows, window = cfg.train.batch_size // shards, cfg.data.shuffle_window // shards  # as many rows held in all
  iterators = {}
  for s in mine:
    shard = records[s::shards].shuffle(seed=cfg.train.seed).repeat()
    iterators[str(s)] = iter(batches(cfg, tokenizer, shard, rows, window, cfg.train.seed))
  return ShardsIterator(iterators)


class ShardsIterator:
  """The batches of several shard iterators, their rows stacked in shard order."""

  def __init__(self, iterators: dict):
    self.iterators = iterators

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(it) for it in self.iterators.values()]
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {"shards": {s: it.get_state() for s, it in self.iterators.items()}}

  def set_state(self, state: dict) -> None:
    if "batches" in state:
      raise UserError("the checkpoint holds a data position of the global shuffle (data.shuffle=global)")
    saved = state["shards"] if "shards" in state else {"0": state}  # checkpoints from before sharded reading
    missing = [s for s in self.iterators if s not in saved]
    if missing:
      raise UserError(f"the checkpoint holds no data position for shard(s) {', '.join(missing)}")
    for s, it in self.iterators.items():
      it.set_state(saved[s])


@dataclasses.dataclass
class EvalSet:
  """This process's rows of fixed evaluation batches, and the size of the whole set."""

  batches: list[dict]
  tokens: int  # target tokens counted by the loss, over all processes' rows
  documents: int  # documents the set's inputs hold tokens of


def prepare_all(cfg, train_source: bool = True) -> None:
  """Prepares the train source (unless not `train_source`) and every eval source, so that their errors come
  before a run starts."""
  if train_source:
    corpus_builder.prepare(cfg)
  for source, _ in config_lib.eval_sources(cfg).values():
    corpus_builder.prepare(source_config(cfg, source))


def source_config(cfg, source: str):
  """A copy of `cfg` reading `source` whole (no data.max_bytes)."""
  other = config_lib.from_json(config_lib.to_json(cfg))
  other.data.source, other.data.max_bytes = source, 0
  return other


def make_eval_sets(
  cfg, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1, validation: bool = True
) -> dict[str, EvalSet]:
  """The eval sets of a run: '' for the validation split (unless not `validation`), then each of
  `data.eval_sources` by name.

  An eval source holds out its documents as a run training on it would (the same hash, so a
  source made from the training files, like `stdlib_docstrings` beside `stdlib`, holds out the
  same files); `NAME=all:SOURCE` evaluates all of its documents.
  """
  sets = {"": make_eval_set(cfg, tokenizer, process_index, process_count)} if validation else {}
  for name, (source, whole) in config_lib.eval_sources(cfg).items():
    sets[name] = make_eval_set(
      source_config(cfg, source), tokenizer, process_index, process_count, "all" if whole else "validation"
    )
  return sets


def make_eval_set(
  cfg, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1, split: str = "validation"
) -> EvalSet:
  """Up to `train.eval_batches` batches of random rows of the validation split, without repeats.

  Rows are cut from the split's documents laid end to end as in training (`lm.data.tokens`), and
  taken in a fixed random order (EVAL_SEED), so even a small set samples every part of the split.
  A split larger than 16 eval sets is sampled by documents first. A split that runs out of rows
  gives fewer batches, the last one padded. Every process keeps its contiguous block of each
  global batch, so the set does not depend on the process count.
  """
  B, T = cfg.train.batch_size, cfg.data.seq_len
  wanted = cfg.train.eval_batches * B
  rows = tokens.Rows(tokens.token_file(cfg, tokenizer, split, max_tokens=16 * wanted * T), T)
  order = [tokens.shuffled_index(i, len(rows), EVAL_SEED) for i in range(min(wanted, len(rows)))]
  local_rows = B // process_count
  block = slice(process_index * local_rows, (process_index + 1) * local_rows)
  local, n_tokens = [], 0
  for lo in range(0, len(order), B):
    packed = [rows[r] for r in order[lo : lo + B]]
    packed += [{k: np.zeros_like(v) for k, v in packed[0].items()}] * (B - len(packed))  # padding rows
    batch = to_batch({k: np.stack([row[k] for row in packed]) for k in packed[0]})
    n_tokens += int(batch["loss_mask"].sum())
    local.append({k: v[block] for k, v in batch.items()})
  return EvalSet(local, n_tokens, rows.documents(order))


def batches(
  cfg, tokenizer: Tokenizer, records: grain.MapDataset, rows: int, shuffle_window: int = 0, seed: int = 0
) -> grain.IterDataset:
  """Tokenizes text records (in the read threads), packs them into rows and batches them.

  Packing puts a long document into many consecutive rows; shuffling rows within windows of
  `shuffle_window` rows spreads it over many batches. grain's window shuffle restores exactly.
  """

  def tokenize(text: str) -> np.ndarray:
    ids = tokenizer.encode([text])[0]
    tokens = np.empty(len(ids) + 2, np.int32)
    tokens[0], tokens[1:-1], tokens[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
    return tokens

  options = grain.ReadOptions(num_threads=cfg.data.worker_threads, prefetch_buffer_size=64)
  tokens = records.map(tokenize).to_iter_dataset(options)
  packed = PackIterDataset(tokens, cfg.data.seq_len + 1)
  if shuffle_window > 1:
    packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=shuffle_window, seed=seed)
  return packed.batch(rows, drop_remainder=True).map(to_batch)


def to_batch(packed: dict) -> dict:
  """The batch format (see the module docstring) from packed rows of T+1 tokens."""
  tokens_BxS, segments_BxS = packed["tokens"], packed["segment_ids"]
  same_document_BxT = (segments_BxS[:, 1:] == segments_BxS[:, :-1]) & (segments_BxS[:, 1:] > 0)
  return {
    "inputs": tokens_BxS[:, :-1],
    "targets": tokens_BxS[:, 1:],
    "segment_ids": segments_BxS[:, :-1],
    "positions": packed["positions"][:, :-1],
    "loss_mask": same_document_BxT.astype(np.float32),
  }


class PackIterDataset(grain.IterDataset):
  """Concatenates token arrays and cuts the stream into rows of `length`.

  Written here rather than grain's ConcatThenSplitIterDataset, whose state does not survive a
  JSON round trip (its tuples come back as lists) and which replays elements on restore.
  """

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    self.length = length

  def __iter__(self) -> grain.DatasetIterator:
    return PackIterator(self._parent.__iter__(), self.length)


class PackIterator(grain.DatasetIterator):
  """Yields {'tokens', 'segment_ids', 'positions'}, each int32 [length]; pads only at the end.

  State: the parent's state before the current document, and how many of its tokens are used.
  """

  def __init__(self, parent: grain.DatasetIterator, length: int):
    super().__init__(parent)
    self.length = length
    self.arange = np.arange(length, dtype=np.int32)
    self.doc_state, self.doc, self.offset = parent.get_state(), np.zeros(0, np.int32), 0

  def __next__(self) -> dict:
    tokens, segment_ids, positions = (np.zeros(self.length, np.int32) for _ in range(3))
    filled, segment = 0, 0
    while filled < self.length:
      if self.offset == len(self.doc):
        self.doc_state = self._parent.get_state()
        try:
          self.doc, self.offset = next(self._parent), 0
        except StopIteration:
          if filled:
            break
          raise
        continue
      n = min(self.length - filled, len(self.doc) - self.offset)
      segment += 1
      tokens[filled : filled + n] = self.doc[self.offset : self.offset + n]
      segment_ids[filled : filled + n] = segment
      positions[filled : filled + n] = self.arange[:n]
      filled += n
      self.offset += n
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

  def get_state(self) -> dict:
    return {"parent": self.doc_state, "offset": self.offset}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.doc_state, self.doc, self.offset = state["parent"], np.zeros(0, np.int32), 0
    if state["offset"]:
      self.doc, self.offset = next(self._parent), state["offset"]


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """The global jax.Arrays whose process-local rows are `local_batch`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
