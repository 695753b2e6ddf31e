"""Prepares a local source once into an array_record TFDS dataset with `train` and `validation`.

The validation split (`data.eval_split`):
- `hash` (default): a document is held out when the SHA-256 of its identity (see `lm.data.sources`),
  read as a number in [0, 1), is below `data.eval_fraction`. The choice of each document depends on
  that document alone, so the split does not change when files are added or reordered, and it is
  the same on every machine and for any process count. If no document falls below the fraction,
  the one with the smallest hash is held out.
- `tail`: the last ceil(fraction * n) documents in source order.
A single-document source (Tiny Shakespeare) is always split at a character offset, its tail held
out, as nanoGPT does. Each prepared corpus is a builder config named by a hash of the source
string, the split and truncation settings and the file list with sizes and mtimes, so the same
files are reused without rereading and a changed file is prepared anew.
"""

import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from lm.data import sources
from lm.errors import UserError

SPLITS = ("train", "validation")
SAMPLE_CHUNK_CHARS = 65_536  # training_text takes documents longer than this in pieces


class _LocalInfo(tfds.core.DatasetInfo):
  def initialize_from_bucket(self) -> None:
    """Nothing: a local corpus has no info on tfds's bucket, and nothing is fetched at run time. (tfds's own,
    with its bucket disabled, makes an empty temporary directory for each new corpus and leaves it behind.)"""


class CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The documents of the local `cfg.data.source`, split into train and validation."""

  name = "lm_corpus"
  VERSION = tfds.core.Version("1.0.0")
  # No download checksums live beside this code; tfds's search for them needs importlib_resources.
  code_path = None

  def __init__(self, cfg):
    self._cfg = cfg
    config = tfds.core.BuilderConfig(name=fingerprint(cfg), description=cfg.data.source)
    super().__init__(data_dir=sources.data_dir(cfg), config=config, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
    return _LocalInfo(builder=self, features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    train, validation = split_documents(self._cfg)
    generate = self._generate_examples
    return {"train": generate(train), "validation": generate(validation)}

  def _generate_examples(self, documents):
    for i, text in enumerate(documents):
      yield i, {"text": text}


def fingerprint(cfg) -> str:
  """A name for the prepared form of a local source; it changes when any file changes."""
  d = cfg.data
  stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in sources.list_files(d.source)]
  key = json.dumps([d.source, d.eval_fraction, d.eval_split, d.max_bytes, d.text_field, stats])
  return "c" + hashlib.sha256(key.encode()).hexdigest()[:16]


def unit_hash(identity: str) -> float:
  """A document identity's SHA-256 as a number in [0, 1): uniform, and the same everywhere."""
  return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") / 2**64


def unit_hash_indices(n: int) -> np.ndarray:
  """Numbers in [0, 1) for the record indices 0..n-1 of a TFDS split: splitmix64, vectorised (not SHA-256).

  The split's masks and index arrays cost a few bytes per record: GBs at 1e8 records.
  """
  z = np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  with np.errstate(over="ignore"):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return (z ^ (z >> np.uint64(31))).astype(np.float64) / 2.0**64


def held_out(hashes: np.ndarray, fraction: float) -> np.ndarray:
  """Which documents of these `unit_hash`es the validation split holds: below `fraction`, at least one."""
  mask = hashes < fraction
  if not mask.any():
    mask[np.argmin(hashes)] = True
  return mask


def split_documents(cfg) -> tuple[Iterator[str], Iterator[str]]:
  """(train, validation) documents of a local source.

  The held-out documents of a hash split are chosen in one pass and kept in memory (about
  `data.eval_fraction` of the corpus); a second pass gives the train documents. A tail split
  counts the documents first.
  """
  fraction = cfg.data.eval_fraction
  held, n, best = [], 0, (2.0, -1, "")  # best: (hash, position, text) of the smallest hash
  for identity, text in sources.identified_documents(cfg):
    h = unit_hash(identity) if cfg.data.eval_split == "hash" else 2.0
    if h < fraction:
      held.append(text)
    elif h < best[0]:
      best = (h, n, text)
    n += 1
  if n == 1:
    text = next(sources.documents(cfg))
    cut = int(len(text) * (1 - fraction))
    if not 0 < cut < len(text):
      raise UserError(
        f"data.source {cfg.data.source!r} is one document of {len(text)} characters: too short to "
        f"hold out data.eval_fraction={fraction} of it"
      )
    return iter([text[:cut]]), iter([text[cut:]])
  if cfg.data.eval_split == "tail":
    n_held = max(1, math.ceil(fraction * n))
    if n_held < n:
      docs = sources.documents(cfg)
      return itertools.islice(docs, n - n_held), itertools.islice(sources.documents(cfg), n - n_held, None)
  elif len(held) < n:
    if held:
      train = (t for i, t in sources.identified_documents(cfg) if unit_hash(i) >= fraction)
    else:  # nothing hashed below the fraction: hold out the document with the smallest hash
      held = [best[2]]
      train = (t for j, (_, t) in enumerate(sources.identified_documents(cfg)) if j != best[1])
    return train, iter(held)
  raise UserError(
    f"data.source {cfg.data.source!r} has {n} documents: too few to hold out "
    f"data.eval_fraction={fraction} of them and train on the rest"
  )


def prepare(cfg) -> dict[str, sources.TextSource]:
  """Random-access 'train' and 'validation' texts of `cfg.data.source`, preparing it if needed."""
  kind, _ = sources.parse(cfg.data.source)
  if kind == "tfds":
    return tfds_splits(cfg)
  builder = CorpusBuilder(cfg)
  if not builder.is_prepared():
    with _prepare_lock(sources.data_dir(cfg)):  # processes sharing a machine prepare it once
      builder = CorpusBuilder(cfg)
      if not builder.is_prepared():
        _prepare(cfg, builder)
  records = builder.as_data_source()
  return {split: sources.TextSource(records[split], "text") for split in SPLITS}


@contextlib.contextmanager
def _prepare_lock(data_dir: str):
  """An exclusive lock on a file in a local `data_dir`; remote directories (gs://) go unlocked."""
  if "://" in data_dir:
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".prepare.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(cfg, builder: "CorpusBuilder") -> None:
  """Writes the TFDS dataset of a local source, logging one line instead of TFDS's banners."""
  start = time.time()
  tfds.display_progress_bar(False)  # the line logged below replaces TFDS's bars and banners
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare()
  splits = builder.info.splits
  logging.info(
    "prepared %s: %d train + %d validation docs, %.1f MB in %.1f s, in %s",
    cfg.data.source,
    splits["train"].num_examples,
    splits["validation"].num_examples,
    sum(splits[s].num_bytes for s in SPLITS) / 1e6,
    time.time() - start,
    builder.data_dir,
  )


def tfds_splits(cfg) -> dict[str, sources.TextSource]:
  """'train' and 'validation' of a `tfds:` source.

  Training reads the named split (default 'train'), cut to `data.max_bytes` of whole records if
  set. Validation is the 'validation' or 'test' split if there is one, else `data.eval_fraction` of
  the training records: by a hash of each record's index (`data.eval_split=hash`) or the last ones.
  """
  builder, split = sources.open_tfds(cfg)
  field, name = cfg.data.text_field, builder.info.full_name
  if field not in builder.info.features:
    raise UserError(f"TFDS dataset {name} has no field {field!r} (set data.text_field)")
  split = split or "train"
  try:
    train = sources.TextSource(builder.as_data_source(split=split), field)
  except (ValueError, KeyError) as e:
    raise UserError(f"TFDS dataset {name} has no split {split!r}: {e}") from None
  if cfg.data.max_bytes:
    total, n = 0, 0
    while n < len(train) and total < cfg.data.max_bytes:
      total += len(train[n].encode())
      n += 1
    train = train.slice(0, n)
  other_splits = [s for s in ("validation", "test") if s in builder.info.splits and s != split]
  if other_splits:
    validation = sources.TextSource(builder.as_data_source(split=other_splits[0]), field)
    return {"train": train, "validation": validation}
  n, fraction = len(train), cfg.data.eval_fraction
  if cfg.data.eval_split == "hash":
    validation = held_out(unit_hash_indices(n), fraction)
  else:
    validation = np.arange(n) >= n - max(1, math.ceil(fraction * n))
  if validation.all():
    raise UserError(f"TFDS dataset {name} split {split!r} is too small to hold out validation")
  return {"train": train.select(np.flatnonzero(~validation)), "validation": train.select(np.flatnonzero(validation))}


def training_text(cfg, max_bytes: int) -> Iterator[str]:
  """Up to `max_bytes` of train-split text for fitting a tokenizer, spread over the whole corpus.

  Documents come in a fixed random order (seed 0, so every run of a corpus gets one tokenizer);
  a long document gives evenly spaced pieces of SAMPLE_CHUNK_CHARS rather than its beginning.
  """
  train = prepare(cfg)["train"]
  for index in np.random.default_rng(0).permutation(len(train)):
    text = train[int(index)]
    pieces = math.ceil(len(text) / SAMPLE_CHUNK_CHARS)
    wanted = min(pieces, math.ceil(max_bytes / SAMPLE_CHUNK_CHARS))
    for piece in np.linspace(0, pieces - 1, wanted).round().astype(int):
      chunk = text[piece * SAMPLE_CHUNK_CHARS : (piece + 1) * SAMPLE_CHUNK_CHARS]
      yield chunk
      max_bytes -= len(chunk.encode())
      if max_bytes <= 0:
        return
