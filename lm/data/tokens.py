"""A split tokenized once into a flat token file on disk, and rows of it read by index.

`data.shuffle=global` trains on rows of this file in a new random order every epoch: rows of
T+1 tokens start every T tokens of the split's documents laid end to end, each document as
[BOS] + ids + [EOS], so every token is a target exactly once per epoch. The order is grain's
index shuffle (a keyed permutation computed per index, seed + epoch), so nothing of size
rows-per-epoch is held in memory, and the data position of a run is one number, the batches
it has consumed. The tokens are memory-mapped: a corpus far larger than RAM costs page cache,
not process memory. Each cache lives under the data directory, named by the prepared split
and a hash of the tokenizer, and is built once (under a lock) and reused by every run of a
sweep.
"""

import hashlib
import json
import logging
import os
import shutil
import time

import grain
import numpy as np
from etils import epath
from tqdm import tqdm

from lm.data import corpus_builder, sources
from lm.tokenizer import Tokenizer

ENCODE_BATCH = 64  # documents per sentencepiece call


class TokenFile:
  """The tokens of a split's documents laid end to end, with each document's first offset."""

  def __init__(self, directory: str):
    meta = json.loads((epath.Path(directory) / "meta.json").read_text())
    self.tokens = np.memmap(os.path.join(directory, "tokens.bin"), dtype=meta["dtype"], mode="r")
    self.starts = np.load(os.path.join(directory, "starts.npy"))  # [documents + 1], the last = len(tokens)
    assert len(self.tokens) == self.starts[-1], directory

  @property
  def documents(self) -> int:
    return len(self.starts) - 1


def token_file(cfg, tokenizer: Tokenizer, split: str, max_tokens: int = 0) -> TokenFile:
  """The TokenFile of `split` ('train', 'validation' or 'all') of `cfg.data.source`, built if needed.

  With `max_tokens` > 0 the documents are taken in a fixed random order (seed 0) until they hold
  that many tokens: a random sample of a split too large to tokenize whole (an eval set).
  """
  splits = corpus_builder.prepare(cfg)
  texts = Concat(splits["train"], splits["validation"]) if split == "all" else splits[split]
  order = np.random.default_rng(0).permutation(len(texts)) if max_tokens else np.arange(len(texts))
  tok_hash = hashlib.sha256(tokenizer.to_bytes()).hexdigest()[:12]
  name = f"{corpus_key(cfg)}-{split}" + (f"-sample{max_tokens}" if max_tokens else "")
  directory = os.path.join(cache_root(cfg), f"{name}-{tok_hash}")
  if not os.path.exists(os.path.join(directory, "meta.json")):
    with corpus_builder._prepare_lock(cache_root(cfg)):
      if not os.path.exists(os.path.join(directory, "meta.json")):
        write_token_file(directory, tokenizer, texts, order, max_tokens, f"tokenizing {cfg.data.source} {split}")
  return TokenFile(directory)


def corpus_key(cfg) -> str:
  """A name for the prepared corpus of `cfg.data.source` that changes when it does."""
  kind, _ = sources.parse(cfg.data.source)
  if kind != "tfds":
    return corpus_builder.fingerprint(cfg)
  d = cfg.data
  key = json.dumps([d.source, d.eval_fraction, d.eval_split, d.max_bytes, d.text_field, sources.data_dir(cfg)])
  return "t" + hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_root(cfg) -> str:
  """Token files go beside the prepared datasets; a remote data dir (gs://) uses the local default."""
  root = sources.data_dir(cfg)
  if "://" in root:
    root = os.path.expanduser("~/.cache/lm/tfds")
  return os.path.join(root, "tokens")


def write_token_file(directory: str, tokenizer: Tokenizer, texts, order, max_tokens: int, description: str) -> None:
  """Tokenizes `texts[i]` for i in `order` (up to `max_tokens` if > 0) into `directory`, via a temporary name."""
  start = time.time()
  staging = f"{directory}.tmp{os.getpid()}"
  os.makedirs(staging, exist_ok=True)
  try:
    total = _write_tokens(staging, tokenizer, texts, order, max_tokens, description)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  os.replace(staging, directory)
  logging.info("%s: %d tokens in %.1f s", description, total, time.time() - start)


def _write_tokens(staging: str, tokenizer: Tokenizer, texts, order, max_tokens: int, description: str) -> int:
  """Writes tokens.bin, starts.npy and meta.json into `staging`; returns the token count."""
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  lengths, total = [], 0
  with open(os.path.join(staging, "tokens.bin"), "wb") as f:
    bar = tqdm(total=len(order), desc=description, unit="doc", leave=False, disable=None)
    for lo in range(0, len(order), ENCODE_BATCH):
      batch = [texts[int(i)] for i in order[lo : lo + ENCODE_BATCH]]
      for ids in tokenizer.encode(batch):
        tokens = np.empty(len(ids) + 2, dtype)
        tokens[0], tokens[1:-1], tokens[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
        f.write(tokens.tobytes())
        lengths.append(len(tokens))
        total += len(tokens)
      bar.update(len(batch))
      if max_tokens and total >= max_tokens:
        break
    bar.close()
  np.save(os.path.join(staging, "starts.npy"), np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
  with open(os.path.join(staging, "meta.json"), "w") as f:
    json.dump({"dtype": np.dtype(dtype).name, "documents": len(lengths), "tokens": total}, f)
  return total


class Concat:
  """Random access to two sequences one after the other."""

  def __init__(self, first, second):
    self.first, self.second = first, second

  def __len__(self) -> int:
    return len(self.first) + len(self.second)

  def __getitem__(self, i: int):
    return self.first[i] if i < len(self.first) else self.second[i - len(self.first)]


class Rows:
  """Random access to the rows of a TokenFile: row r is tokens [r * T, r * T + T + 1).

  Each row is {'tokens', 'segment_ids', 'positions'} as `lm.data.pipeline.PackIterator` makes
  them: segments numbered from 1 within the row, positions restarting at 0 for each; the last
  row is padded (segment 0) where the tokens run out.
  """

  def __init__(self, file: TokenFile, seq_len: int):
    self.file, self.seq_len = file, seq_len
    self.arange = np.arange(seq_len + 1, dtype=np.int64)

  def __len__(self) -> int:
    return -(-(len(self.file.tokens) - 1) // self.seq_len)

  def __getitem__(self, r: int) -> dict:
    lo = int(r) * self.seq_len
    n = min(self.seq_len + 1, len(self.file.tokens) - lo)
    offsets = lo + self.arange[:n]
    docs = np.searchsorted(self.file.starts, offsets, side="right") - 1
    row = {k: np.zeros(self.seq_len + 1, np.int32) for k in ("tokens", "segment_ids", "positions")}
    row["tokens"][:n] = self.file.tokens[lo : lo + n]
    row["segment_ids"][:n] = docs - docs[0] + 1
    row["positions"][:n] = offsets - np.maximum(self.file.starts[docs], lo)
    return row

  def documents(self, rows) -> int:
    """How many distinct documents the inputs of the rows at indices `rows` hold tokens of."""
    seen = set()
    for r in rows:
      lo = int(r) * self.seq_len
      hi = min(lo + self.seq_len - 1, len(self.file.tokens) - 2)
      first, last = np.searchsorted(self.file.starts, [lo, hi], side="right") - 1
      seen.update(range(int(first), int(last) + 1))
    return len(seen)


def shuffled_index(index: int, length: int, seed: int) -> int:
  """Position `index` of a random permutation of range(length), the one `shuffled` uses in epoch 0."""
  return grain.experimental.index_shuffle(index, max_index=length - 1, seed=seed, rounds=4)


def shuffled(rows: Rows, seed: int) -> grain.MapDataset:
  """`rows` as an endless grain dataset, reshuffled every epoch (seed + epoch)."""
  return grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
