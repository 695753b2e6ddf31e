"""The text sources that `data.source` names, read as documents (str) in a fixed order.

- `stdlib`: the .py files of the running Python's standard library (not site-packages).
- `text:GLOB`: plain text files, one document each.
- `jsonl:GLOB`: one document per line, from the field `data.text_field`.
- `tfds:NAME[/CONFIG][:SPLIT]`: an already-prepared TFDS dataset (array_record), see `open_tfds`.

Files are decoded as UTF-8 with errors='replace': a stray non-UTF-8 byte becomes U+FFFD instead of
stopping a corpus of thousands of files. Empty documents are skipped. Files and globs are read in
sorted order, so a source always yields the same documents.
"""

import glob
import json
import os
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds

from lm.errors import UserError

USAGE = "stdlib, text:GLOB, jsonl:GLOB or tfds:NAME[/CONFIG][:SPLIT]"


def parse(source: str) -> tuple[str, str]:
  """Splits `data.source` into (kind, argument)."""
  kind, _, arg = source.partition(":")
  if (kind == "stdlib" and not arg) or (kind in ("text", "jsonl", "tfds") and arg):
    return kind, arg
  raise UserError(f"unknown data.source {source!r}: expected {USAGE}")


def data_dir(cfg) -> str:
  """Where prepared TFDS datasets live: data.cache_dir, else $LM_DATA_DIR, else ~/.cache/lm/tfds."""
  path = cfg.data.cache_dir or os.environ.get("LM_DATA_DIR") or "~/.cache/lm/tfds"
  return os.path.expanduser(path)


def list_files(source: str) -> list[str]:
  """The sorted files of a local source."""
  kind, arg = parse(source)
  assert kind != "tfds", source
  if kind == "stdlib":
    files = []
    for directory, subdirectories, names in os.walk(sysconfig.get_paths()["stdlib"]):
      subdirectories[:] = [d for d in subdirectories if d != "site-packages"]
      files += [os.path.join(directory, n) for n in names if n.endswith(".py")]
  else:
    files = [f for f in glob.glob(os.path.expanduser(arg), recursive=True) if os.path.isfile(f)]
  if not files:
    raise UserError(f"data.source {source!r} matches no files")
  return sorted(files)


def documents(cfg) -> Iterator[str]:
  """The non-empty documents of a local source, cut to `data.max_bytes` of UTF-8 if that is > 0.

  Documents are kept whole while the total stays within the budget; the one that crosses it is cut
  there, so a single-file corpus is truncated too.
  """
  files = list_files(cfg.data.source)
  kind, _ = parse(cfg.data.source)
  docs = jsonl_documents(files, cfg.data.text_field) if kind == "jsonl" else map(read_text, files)
  limit, total, count = cfg.data.max_bytes, 0, 0
  for doc in docs:
    if not doc:
      continue
    if limit:
      size = len(doc.encode())
      if total + size >= limit:
        yield doc.encode()[: limit - total].decode("utf-8", errors="ignore")
        return
      total += size
    count += 1
    yield doc
  if not count:
    raise UserError(f"data.source {cfg.data.source!r} is empty: {len(files)} files, no text")


def read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def jsonl_documents(files: list[str], field: str) -> Iterator[str]:
  """The `field` of every line of the JSON-lines `files`; blank lines are skipped."""
  for path in files:
    with open(path, "rb") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
          raise UserError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
          raise UserError(f"{path}:{number}: no string field {field!r} (set data.text_field)")
        yield record[field]


def open_tfds(cfg) -> tuple[tfds.core.DatasetBuilder, str]:
  """The prepared builder of a `tfds:NAME[/CONFIG][:SPLIT]` source and its split ('' if none)."""
  _, arg = parse(cfg.data.source)
  name, _, split = arg.partition(":")
  for directory in (data_dir(cfg), None):  # None: TFDS's own default data dirs
    try:
      builder = tfds.builder(name, data_dir=directory)
    except tfds.core.registered.DatasetNotFoundError:
      continue
    if builder.is_prepared():
      return builder, split
  raise UserError(
    f"TFDS dataset {name!r} is not prepared in {data_dir(cfg)} or the default TFDS data dir "
    "(prepare it with array_record, e.g. `tfds build --file_format=array_record`)"
  )


class TextSource:
  """Random access to the text field of records [start, stop) of a TFDS data source."""

  def __init__(self, records, field: str, start: int = 0, stop: int | None = None):
    self.records, self.field = records, field
    self.start, self.stop = start, len(records) if stop is None else stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> str:
    value = self.records[self.start + index][self.field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

  def slice(self, start: int, stop: int) -> "TextSource":
    """Records [start, stop) of this source."""
    return TextSource(self.records, self.field, self.start + start, self.start + stop)
