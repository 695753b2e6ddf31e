"""Tokenizers: a sentencepiece BPE trained on the corpus, or raw UTF-8 bytes.

Both kinds reserve the same special ids at the start of the vocab, so data and model code never
ask which kind they hold. Special tokens never come from text: `encode` turns the text
"<|user|>" into ordinary tokens, and chat code inserts `special["<|user|>"]` itself. Decoding is
exact: `decode(encode([x])[0]) == x` for any text x.
"""

import abc
import io
import json

import numpy as np
import sentencepiece
from etils import epath

from lm.errors import UserError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
special = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
PAD_ID, BOS_ID, EOS_ID = special["<pad>"], special["<bos>"], special["<eos>"]
CHUNK_CHARS = 4096  # longer lines are cut: sentencepiece skips long training sentences
SP_SPACE = "\u2581"  # sentencepiece's stand-in for a space; a real one in text must go as bytes


class Tokenizer(abc.ABC):
  """Text <-> ids. Subclasses set `kind`, `vocab_size`, `token_bytes` and the methods below."""

  kind: str
  vocab_size: int
  token_bytes: np.ndarray  # int32 [vocab_size]: UTF-8 bytes each id decodes to, 0 for specials

  @abc.abstractmethod
  def encode(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without bos/eos."""

  @abc.abstractmethod
  def decode_plain(self, ids: list[int]) -> str:
    """Text of ids that hold no special token."""

  @abc.abstractmethod
  def model_bytes(self) -> bytes:
    """The trained model file, empty when there is none."""

  def decode(self, ids) -> str:
    """Text of `ids`, skipping pad/bos/eos and writing chat markers as their names."""
    parts, run = [], []
    for i in map(int, ids):
      if i >= len(SPECIAL_TOKENS):
        run.append(i)
      elif i not in (PAD_ID, BOS_ID, EOS_ID):
        parts += [self.decode_plain(run), SPECIAL_TOKENS[i]]
        run = []
    return "".join(parts) + self.decode_plain(run)

  def metadata(self) -> dict:
    return {"kind": self.kind, "vocab_size": self.vocab_size, "special": special}

  def save(self, directory) -> None:
    """Writes `tokenizer.json` (kind and metadata) and, for sentencepiece, `tokenizer.model`."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(self.metadata(), indent=2))
    if self.model_bytes():
      (directory / "tokenizer.model").write_bytes(self.model_bytes())

  def to_bytes(self) -> bytes:
    """The whole tokenizer as one blob: a JSON metadata line, then the model file."""
    return json.dumps(self.metadata()).encode() + b"\n" + self.model_bytes()

  @staticmethod
  def from_bytes(data: bytes) -> "Tokenizer":
    """Inverse of `to_bytes`."""
    header, _, model = data.partition(b"\n")
    return from_metadata(json.loads(header), model)


class ByteTokenizer(Tokenizer):
  """One id per UTF-8 byte, after the specials; invalid UTF-8 decodes with errors='replace'."""

  kind = "byte"
  vocab_size = len(SPECIAL_TOKENS) + 256

  def __init__(self):
    self.token_bytes = np.array([0] * len(SPECIAL_TOKENS) + [1] * 256, np.int32)

  def encode(self, texts: list[str]) -> list[list[int]]:
    offset = len(SPECIAL_TOKENS)
    return [(np.frombuffer(t.encode(), np.uint8).astype(np.int32) + offset).tolist() for t in texts]

  def decode_plain(self, ids: list[int]) -> str:
    return bytes(i - len(SPECIAL_TOKENS) for i in ids).decode("utf-8", errors="replace")

  def model_bytes(self) -> bytes:
    return b""


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece BPE model with byte fallback and identity normalization."""

  kind = "sentencepiece"

  def __init__(self, model: bytes):
    self._model = model
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    self.vocab_size = self._sp.vocab_size()
    assert [self._sp.id_to_piece(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)
    self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SP_SPACE.encode()]

  def _piece_bytes(self, i: int) -> int:
    if self._sp.is_control(i) or self._sp.is_unknown(i):
      return 0
    if self._sp.is_byte(i):
      return 1
    return len(self._sp.id_to_piece(i).replace(SP_SPACE, " ").encode())

  def encode(self, texts: list[str]) -> list[list[int]]:
    # Texts go to sentencepiece as lines, 3x faster than whole; U+2581 between the parts as bytes.
    counts, chunks = [], []
    for text in texts:
      parts = [split_lines(part) for part in text.split(SP_SPACE)]
      counts.append([len(p) for p in parts])
      chunks += [c for p in parts for c in p]
    encoded = iter(self._sp.encode(chunks))
    out = []
    for text_counts in counts:
      ids = []
      for j, count in enumerate(text_counts):
        if j:
          ids += self._space_ids
        for _ in range(count):
          ids += next(encoded)
      out.append(ids)
    return out

  def decode_plain(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def model_bytes(self) -> bytes:
    return self._model


def split_lines(text: str) -> list[str]:
  """`text` as its lines (with line ends), each cut into pieces of at most CHUNK_CHARS."""
  lines = text.splitlines(keepends=True)
  return [line[i : i + CHUNK_CHARS] for line in lines for i in range(0, len(line), CHUNK_CHARS)]


def train_tokenizer(cfg, documents) -> Tokenizer:
  """A tokenizer of `cfg.tokenizer.kind`, trained on the first `tokenizer.train_bytes` of text."""
  if cfg.tokenizer.kind == "byte":
    return ByteTokenizer()
  sentences = list(training_sentences(documents, cfg.tokenizer.train_bytes))
  if not sentences:
    raise UserError("no text to train the tokenizer on")
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      model_type="bpe",
      vocab_size=cfg.tokenizer.vocab_size,
      pad_id=PAD_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      unk_id=len(SPECIAL_TOKENS),
      pad_piece=SPECIAL_TOKENS[PAD_ID],
      bos_piece=SPECIAL_TOKENS[BOS_ID],
      eos_piece=SPECIAL_TOKENS[EOS_ID],
      control_symbols=list(SPECIAL_TOKENS[3:]),
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      max_sentence_length=4 * CHUNK_CHARS,  # bytes; a chunk of CHUNK_CHARS chars always fits
      num_threads=2,
      minloglevel=2,
    )
  except RuntimeError as e:
    if "Vocabulary size too high" not in str(e):
      raise
    limit = str(e).rsplit("<=", 1)[-1].strip(" .")
    raise UserError(
      f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too large for this training text "
      f"(sentencepiece allows at most {limit})"
    ) from None
  return SentencePieceTokenizer(model.getvalue())


def training_sentences(documents, max_bytes: int):
  """The lines of `documents` (see `split_lines`) until `max_bytes` of UTF-8 are reached."""
  for doc in documents:
    for line in split_lines(doc):
      yield line
      max_bytes -= len(line.encode())
      if max_bytes <= 0:
        return


def from_metadata(meta: dict, model: bytes) -> Tokenizer:
  """Rebuilds a tokenizer from its `metadata()` and model file."""
  assert meta["special"] == special, meta["special"]
  return ByteTokenizer() if meta["kind"] == "byte" else SentencePieceTokenizer(model)


def load_tokenizer(workdir) -> Tokenizer:
  """The tokenizer that `Tokenizer.save(workdir)` wrote."""
  workdir = epath.Path(workdir)
  meta_path, model_path = workdir / "tokenizer.json", workdir / "tokenizer.model"
  if not meta_path.exists():
    raise UserError(f"no tokenizer in {workdir}: {meta_path} is missing")
  meta = json.loads(meta_path.read_text())
  if meta["kind"] == "byte":
    return from_metadata(meta, b"")
  if not model_path.exists():
    raise UserError(f"sentencepiece tokenizer in {workdir} is incomplete: {model_path} is missing")
  return from_metadata(meta, model_path.read_bytes())
