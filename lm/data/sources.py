"""The text sources that `data.source` names, read as documents (str) in a fixed order.

- `stdlib`: the .py files of the running Python's standard library (not site-packages).
- `stdlib_docstrings`: the docstrings of those files, one document per file: English prose.
- `text:GLOB`: plain text files, one document each.
- `jsonl:GLOB`: one document per line, from the field `data.text_field` (files ending .gz are gzip).
- `tfds:NAME[/CONFIG][:VERSION][:SPLIT]`: an already-prepared TFDS dataset (array_record), see `open_tfds`.

Files are decoded as UTF-8 with errors='replace': a stray non-UTF-8 byte becomes U+FFFD instead of
stopping a corpus of thousands of files. Empty documents are skipped. Files and globs are read in
sorted order, so a source always yields the same documents.

Every document of a local source has an identity that does not depend on the machine: a file's path
relative to the source's root (the standard library's directory, or the directory part of the glob
before its first wildcard), or for a JSON-lines record its `id` field, else a hash of its text. The
validation split is chosen by hashing identities (`lm.data.corpus_builder`), so `stdlib` and
`stdlib_docstrings` hold out the same files.
"""

import ast
import functools
import glob
import gzip
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds

from lm.errors import UserError

USAGE = "stdlib, stdlib_docstrings, text:GLOB, jsonl:GLOB or tfds:NAME[/CONFIG][:VERSION][:SPLIT]"
STDLIB_KINDS = ("stdlib", "stdlib_docstrings")


def parse(source: str) -> tuple[str, str]:
  """Splits `data.source` into (kind, argument)."""
  kind, _, arg = source.partition(":")
  if (kind in STDLIB_KINDS and not arg) or (kind in ("text", "jsonl", "tfds") and arg):
    return kind, arg
  raise UserError(f"unknown data.source {source!r}: expected {USAGE}")


def parse_tfds(source: str) -> tuple[str, str, str, str]:
  """(name, config, version, split) of a `tfds:NAME[/CONFIG][:VERSION][:SPLIT]` source ('' where absent)."""
  _, arg = parse(source)
  name, *rest = arg.split(":")
  version = rest.pop(0) if rest and re.fullmatch(r"\d+\.\d+\.\d+", rest[0]) else ""
  split = ":".join(rest)  # a split may hold a slice with colons: train[:10%]
  name, _, config = name.partition("/")
  if not re.fullmatch(r"\w+", name) or not re.fullmatch(r"[\w.-]*", config) or re.match(r"\d", split):
    raise UserError(f"cannot parse data.source {source!r}: expected tfds:NAME[/CONFIG][:VERSION][:SPLIT]")
  return name, config, version, split


def data_dir(cfg) -> str:
  """Where prepared TFDS datasets live: data.cache_dir, else $LM_DATA_DIR, else ~/.cache/lm/tfds."""
  path = cfg.data.cache_dir or os.environ.get("LM_DATA_DIR") or "~/.cache/lm/tfds"
  return os.path.expanduser(path)


def root(source: str) -> str:
  """The directory that a local source's file identities are relative to."""
  kind, arg = parse(source)
  if kind in STDLIB_KINDS:
    return sysconfig.get_paths()["stdlib"]
  pattern = os.path.expanduser(arg)
  static = re.split(r"[*?[]", pattern, maxsplit=1)[0]
  return os.path.dirname(static) if static != pattern else os.path.dirname(pattern)


def list_files(source: str) -> list[str]:
  """The sorted files of a local source."""
  kind, arg = parse(source)
  assert kind != "tfds", source
  if kind in STDLIB_KINDS:
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
  """The texts of `identified_documents`."""
  return (text for _, text in identified_documents(cfg))


def identified_documents(cfg) -> Iterator[tuple[str, str]]:
  """(identity, text) of the non-empty documents of a local source, cut to `data.max_bytes` of UTF-8 if > 0.

  Documents are kept whole while the total stays within the budget; the one that crosses it is cut
  there, so a single-file corpus is truncated too.
  """
  files = list_files(cfg.data.source)
  kind, _ = parse(cfg.data.source)
  base = root(cfg.data.source)
  if kind == "jsonl":
    docs = jsonl_documents(files, cfg.data.text_field)
  else:
    read = docstrings if kind == "stdlib_docstrings" else read_text
    docs = ((os.path.relpath(f, base), read(f)) for f in files)
  limit, total, count = cfg.data.max_bytes, 0, 0
  for identity, doc in docs:
    if not doc:
      continue
    if limit:
      size = len(doc.encode())
      if total + size >= limit:
        yield identity, doc.encode()[: limit - total].decode("utf-8", errors="ignore")
        return
      total += size
    count += 1
    yield identity, doc
  if not count:
    raise UserError(f"data.source {cfg.data.source!r} is empty: {len(files)} files, no text")


def prepared_record(source: str) -> dict | None:
  """What `lm data prepare` made the documents of `source` from, if it names a prepared directory's output
  (`jsonl:DIR/output/*`): DIR, its `prepare.*` config, the report's counts and the output files' sizes. A run
  training on them writes this as `prepared_data.json`. None for any other source."""
  kind, _ = parse(source)
  base = root(source)
  prepared = os.path.dirname(base)
  if (
    kind != "jsonl"
    or os.path.basename(base) != "output"
    or not os.path.exists(os.path.join(prepared, "prepare_config.json"))
  ):
    return None
  with open(os.path.join(prepared, "prepare_config.json")) as f:
    config = json.load(f).get("prepare", {})
  record = {"directory": os.path.abspath(prepared), "prepare": config}
  report_path = os.path.join(prepared, "report", "report.json")
  if os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
    record["report"] = {k: report.get(k) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "removed")}
  record["files"] = {os.path.relpath(f, prepared): os.path.getsize(f) for f in list_files(source)}
  return record


def docstrings(path: str) -> str:
  """The module, class and function docstrings of a Python file, separated by blank lines ('' if none)."""
  return _docstrings(path, os.stat(path).st_mtime_ns)


@functools.cache
def _docstrings(path: str, mtime_ns: int) -> str:
  """`docstrings`, parsed once per version of a file: preparing a split reads a source twice."""
  try:
    tree = ast.parse(read_text(path))
  except (SyntaxError, ValueError):  # the standard library holds a few deliberately broken test files
    return ""
  nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
  texts = [ast.get_docstring(n) for n in nodes]
  return "\n\n".join(t for t in texts if t)


def text_identity(text: str) -> str:
  """The identity of a record without an id: a hash of its text (duplicates share a split)."""
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def jsonl_documents(files: list[str], field: str) -> Iterator[tuple[str, str]]:
  """(identity, `field`) of every line of the JSON-lines `files`; blank lines are skipped.

  The identity is the record's `id` (any JSON value, as text), else `text_identity` of the field.
  """
  for where, record in jsonl_records(files):
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
      raise UserError(f"{where}: no string field {field!r} (set data.text_field)")
    identity = record.get("id")
    yield (text_identity(record[field]) if identity is None else f"id:{identity}"), record[field]


def jsonl_records(files: list[str]) -> Iterator[tuple[str, object]]:
  """("PATH:LINE", parsed JSON value) of every non-blank line of the JSON-lines `files`."""
  for path in files:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:  # lm data prepare writes .jsonl.gz
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
          raise UserError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        yield f"{path}:{number}", record


def open_tfds(cfg) -> tuple[tfds.core.DatasetBuilder, str]:
  """The prepared builder of a `tfds:NAME[/CONFIG][:VERSION][:SPLIT]` source and its split ('' if none)."""
  base, config, version, split = parse_tfds(cfg.data.source)
  name = base + (f"/{config}" if config else "") + (f":{version}" if version else "")
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
  """Random access to the text field of some records of a TFDS data source: [start, stop) or `indices`."""

  def __init__(self, records, field: str, start: int = 0, stop: int | None = None, indices=None):
    self.records, self.field = records, field
    self.start, self.stop = start, len(records) if stop is None else stop
    self.indices = indices

  def __len__(self) -> int:
    return self.stop - self.start if self.indices is None else len(self.indices)

  def __getitem__(self, index: int) -> str:
    record = self.start + index if self.indices is None else int(self.indices[index])
    value = self.records[record][self.field]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

  def slice(self, start: int, stop: int) -> "TextSource":
    """Records [start, stop) of this source."""
    assert self.indices is None
    return TextSource(self.records, self.field, self.start + start, self.start + stop)

  def select(self, indices) -> "TextSource":
    """The records at `indices` (positions in this source)."""
    assert self.indices is None
    return TextSource(self.records, self.field, indices=self.start + indices)
