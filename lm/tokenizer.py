"""Tokenizers: a sentencepiece BPE trained on the corpus, raw UTF-8 bytes, or one imported with a Hugging Face
checkpoint (`lm import hf`).

Both kinds trained by lm reserve the same special ids at the start of the vocab (SPECIAL_TOKENS); an
imported one keeps its own ids and names its begin/end-of-sequence tokens `<bos>` and `<eos>` in
`tok.special`. Code asks a tokenizer for `tok.bos_id`, `tok.eos_id` and `tok.pad_id`, never which kind
it holds. Special tokens never come from text:
`encode` turns the text "<|user|>" into ordinary tokens, and chat code inserts
`tok.special["<|user|>"]` itself. Decoding is exact: `decode(encode([x])[0]) == x` for any text x.

A tokenizer saved before a special token existed (its tokenizer.json lacks `<|tool|>`), or one
made elsewhere, loads with the missing tokens added at the end of its vocab (ids vocab_size,
vocab_size + 1, ...; `tok.added` names them and `save` records them). `tok.loaded_vocab_size` is the
vocab it was saved with, so a model trained with it can be grown to match (`grow_vocab`).
"""

import abc
import io
import json
import re

import jax.numpy as jnp
import numpy as np
import sentencepiece
from etils import epath

from lm.errors import UserError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>")
special = {name: i for i, name in enumerate(SPECIAL_TOKENS)}  # the ids a tokenizer trained by lm reserves
PAD_ID, BOS_ID, EOS_ID = special["<pad>"], special["<bos>"], special["<eos>"]
CHUNK_CHARS = 4096  # longer lines are cut: sentencepiece skips long training sentences
SP_SPACE = "\u2581"  # sentencepiece's stand-in for a space; a real one in text must go as bytes


class Tokenizer(abc.ABC):
  """Text <-> ids. Subclasses set `kind`, the trained `vocab_size` and `token_bytes`, call `_init_special`
  and define the methods below."""

  kind: str
  vocab_size: int  # every id: the trained vocabulary, then the specials added after it
  token_bytes: np.ndarray  # int32 [vocab_size]: UTF-8 bytes each id decodes to, 0 for specials
  special: dict[str, int]  # each special token's id; <pad>, <bos> and <eos> are always 0, 1 and 2
  added: tuple[str, ...]  # the specials appended after the trained vocabulary, in id order
  loaded_vocab_size: int  # vocab_size as saved, before loading added the missing specials

  @abc.abstractmethod
  def encode(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without bos/eos."""

  @abc.abstractmethod
  def decode_plain(self, ids: list[int]) -> str:
    """Text of ids that hold no special token."""

  @abc.abstractmethod
  def model_bytes(self) -> bytes:
    """The trained model file, empty when there is none."""

  def piece_bytes(self, i: int) -> bytes:
    """The UTF-8 bytes id `i` adds to decoded text (b"" for a special). This version decodes the id alone, which
    is exact when every token stands for whole characters; the byte and sentencepiece kinds are exact always."""
    return b"" if i in self._names else self.decode_plain([i]).encode()

  def fallback_mask(self) -> np.ndarray:
    """bool [vocab_size]: the ids that are byte-fallback pieces (<0xNN>) or unknown, none for this kind."""
    return np.zeros(self.vocab_size, bool)

  def _init_special(self, reserved: dict[str, int], fixed: bool = True) -> None:
    """Takes `reserved` (name -> id, inside the trained vocabulary) as the special tokens, none added yet. With
    `fixed` (lm's own kinds), <pad>, <bos> and <eos> must be ids 0, 1 and 2."""
    for name, i in (("<pad>", PAD_ID), ("<bos>", BOS_ID), ("<eos>", EOS_ID)):
      if fixed and reserved.get(name) != i:
        raise UserError(f"this {self.kind} tokenizer has {name} at id {reserved.get(name)}; lm needs it at id {i}")
      if reserved.get(name) is None:
        raise UserError(f"this {self.kind} tokenizer has no {name} token")
    self.special, self.added = dict(reserved), ()
    self._names = {i: name for name, i in self.special.items()}
    self.loaded_vocab_size = self.vocab_size

  def add_special(self, names) -> None:
    """Appends the special tokens `names` (not yet held) after the vocabulary: ids vocab_size, vocab_size + 1, ..."""
    for name in names:
      assert name not in self.special, name
      self.special[name], self._names[self.vocab_size] = self.vocab_size, name
      self.vocab_size += 1
      self.added += (name,)
    self.token_bytes = np.concatenate([self.token_bytes, np.zeros(self.vocab_size - len(self.token_bytes), np.int32)])

  @property
  def bos_id(self) -> int:
    return self.special["<bos>"]

  @property
  def eos_id(self) -> int:
    return self.special["<eos>"]

  @property
  def pad_id(self) -> int:
    return self.special["<pad>"]

  def decode(self, ids) -> str:
    """Text of `ids`, skipping pad/bos/eos and writing chat markers as their names."""
    parts, run = [], []
    for i in map(int, ids):
      name = self._names.get(i)
      if name is None:
        run.append(i)
      elif i not in (self.pad_id, self.bos_id, self.eos_id):
        parts += [self.decode_plain(run), name]
        run = []
    return "".join(parts) + self.decode_plain(run)

  def metadata(self) -> dict:
    """{kind, vocab_size, special: name -> id, added: the names of `added`}, as tokenizer.json holds it."""
    return {"kind": self.kind, "vocab_size": self.vocab_size, "special": self.special, "added": list(self.added)}

  def save(self, directory) -> None:
    """Writes `tokenizer.json` (kind and metadata) and the model file, if the kind has one (`MODEL_FILES`)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(self.metadata(), indent=2))
    if self.model_bytes():
      (directory / MODEL_FILES[self.kind]).write_bytes(self.model_bytes())

  def to_bytes(self) -> bytes:
    """The whole tokenizer as one blob: a JSON metadata line, then the model file."""
    return json.dumps(self.metadata()).encode() + b"\n" + self.model_bytes()

  @staticmethod
  def from_bytes(data: bytes) -> "Tokenizer":
    """Inverse of `to_bytes`."""
    header, _, model = data.partition(b"\n")
    return from_metadata(json.loads(header), model)


class ByteTokenizer(Tokenizer):
  """One id per UTF-8 byte, after the reserved specials; invalid UTF-8 decodes with errors='replace'."""

  kind = "byte"
  vocab_size = len(SPECIAL_TOKENS) + 256  # with lm's reserved specials (`reserved` defaults to them)

  def __init__(self, reserved: dict[str, int] | None = None):
    reserved = special if reserved is None else reserved
    if sorted(reserved.values()) != list(range(len(reserved))):
      raise UserError(f"a byte tokenizer's specials are ids 0..{len(reserved) - 1}, not {sorted(reserved.values())}")
    self.offset = len(reserved)  # the id of byte 0
    self.vocab_size = self.offset + 256
    self.token_bytes = np.array([0] * self.offset + [1] * 256, np.int32)
    self._init_special(reserved)

  def encode(self, texts: list[str]) -> list[list[int]]:
    return [(np.frombuffer(t.encode(), np.uint8).astype(np.int32) + self.offset).tolist() for t in texts]

  def decode_plain(self, ids: list[int]) -> str:
    return bytes(i - self.offset for i in ids).decode("utf-8", errors="replace")

  def piece_bytes(self, i: int) -> bytes:
    return b"" if i in self._names else bytes([i - self.offset])

  def model_bytes(self) -> bytes:
    return b""


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece BPE model with byte fallback and identity normalization; its specials are control symbols."""

  kind = "sentencepiece"

  def __init__(self, model: bytes, reserved: dict[str, int] | None = None):
    reserved = special if reserved is None else reserved
    self._model = model
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    self.vocab_size = self._sp.vocab_size()
    for name, i in reserved.items():
      piece = self._sp.id_to_piece(i) if 0 <= i < self.vocab_size else None
      if piece != name or not self._sp.is_control(i):
        raise UserError(f"the sentencepiece model does not hold the special token {name} as a control symbol at id {i}")
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)
    self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SP_SPACE.encode()]
    self._init_special(reserved)

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

  def piece_bytes(self, i: int) -> bytes:
    if i in self._names or self._sp.is_control(i) or self._sp.is_unknown(i):
      return b""
    if self._sp.is_byte(i):
      return bytes([int(self._sp.id_to_piece(i)[3:5], 16)])
    return self._sp.id_to_piece(i).replace(SP_SPACE, " ").encode()

  def fallback_mask(self) -> np.ndarray:
    trained = [self._sp.is_byte(i) or self._sp.is_unknown(i) for i in range(self._sp.vocab_size())]
    return np.array(trained + [False] * (self.vocab_size - len(trained)), bool)

  def model_bytes(self) -> bytes:
    return self._model


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer (its tokenizer.json), imported with a checkpoint by `lm import hf`.

  `encode` adds no special tokens and reads the text of a special token as ordinary text, as lm's own kinds
  do. Ids keep the checkpoint's meaning; the vocabulary may be larger than the tokenizer's (a model whose
  embedding has unused rows): `vocab_size` is the model's. `token_bytes` counts a byte-level (GPT-2 style)
  token's characters as its bytes, a byte-fallback piece (<0xNN>) as one byte, and otherwise the UTF-8 of the
  token decoded alone.
  """

  kind = "huggingface"

  def __init__(self, model: bytes, reserved: dict[str, int], vocab_size: int):
    import tokenizers  # noqa: PLC0415  (only imported runs need it)

    self._model = model
    self._tk = tokenizers.Tokenizer.from_str(model.decode())
    self._tk.encode_special_tokens = True  # the text "<s>" is three characters, never the special id
    self.vocab_size = vocab_size
    if self._tk.get_vocab_size(with_added_tokens=True) > vocab_size:
      raise UserError(
        f"the tokenizer has {self._tk.get_vocab_size(with_added_tokens=True)} tokens, more than the model's "
        f"vocabulary of {vocab_size}"
      )
    self.token_bytes = self._token_bytes()
    self._init_special(reserved, fixed=False)

  def _token_bytes(self) -> np.ndarray:
    byte_level = (json.loads(self._model).get("decoder") or {}).get("type") == "ByteLevel"
    specials = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      piece = self._tk.id_to_token(i)
      if piece is None or piece in specials:
        continue
      if byte_level:
        out[i] = len(piece)
      elif _is_byte_piece(piece):
        out[i] = 1
      else:
        out[i] = len(self._tk.decode([i], skip_special_tokens=False).encode())
    return out

  def encode(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)] if texts else []

  def decode_plain(self, ids: list[int]) -> str:
    return self._tk.decode(list(ids), skip_special_tokens=False)

  def piece_bytes(self, i: int) -> bytes:
    piece = self._tk.id_to_token(i)
    return bytes([int(piece[3:5], 16)]) if _is_byte_piece(piece) else super().piece_bytes(i)

  def fallback_mask(self) -> np.ndarray:
    unknown = getattr(self._tk.model, "unk_token", None)  # BPE and WordPiece models name theirs
    pieces = [self._tk.id_to_token(i) for i in range(self.vocab_size)]
    return np.array([_is_byte_piece(p) or (p is not None and p == unknown) for p in pieces], bool)

  def model_bytes(self) -> bytes:
    return self._model


def _is_byte_piece(piece: str | None) -> bool:
  """Whether a Hugging Face token is a byte-fallback piece, <0xNN>."""
  return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


MODEL_FILES = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer_hf.json"}  # the byte kind has none


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
    small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
    if small:  # each character of the text is a piece, beside the specials and the 256 byte pieces
      raise UserError(
        f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too small for this training text: sentencepiece "
        f"needs at least {small[2]} (every character it holds, the specials and the 256 byte pieces)"
      ) from None
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


def from_metadata(meta: dict, model: bytes, add_missing: bool = True) -> Tokenizer:
  """Rebuilds a tokenizer from its `metadata()` and model file.

  With `add_missing`, the SPECIAL_TOKENS it lacks (a tokenizer saved before they existed) are
  appended after its vocabulary; its `loaded_vocab_size` stays the saved `vocab_size`.
  """
  added = list(meta.get("added", ()))  # tokenizer.json files from before added specials hold none
  reserved = {name: i for name, i in meta["special"].items() if name not in added}
  if meta["kind"] == "byte":
    tok = ByteTokenizer(reserved)
  elif meta["kind"] == "huggingface":
    tok = HuggingFaceTokenizer(model, reserved, meta["vocab_size"] - len(added))
  else:
    tok = SentencePieceTokenizer(model, reserved)
  tok.add_special(added)
  assert {name: tok.special[name] for name in meta["special"]} == meta["special"], meta
  assert tok.vocab_size == meta["vocab_size"], meta
  tok.loaded_vocab_size = tok.vocab_size
  if add_missing:
    tok.add_special([name for name in SPECIAL_TOKENS if name not in tok.special])
  return tok


def load_tokenizer(workdir, add_missing: bool = True) -> Tokenizer:
  """The tokenizer that `Tokenizer.save(workdir)` wrote, with missing specials added (see `from_metadata`)."""
  workdir = epath.Path(workdir)
  meta_path = workdir / "tokenizer.json"
  if not meta_path.exists():
    raise UserError(f"no tokenizer in {workdir}: {meta_path} is missing")
  meta = json.loads(meta_path.read_text())
  if meta["kind"] == "byte":
    return from_metadata(meta, b"", add_missing)
  model_path = workdir / MODEL_FILES[meta["kind"]]
  if not model_path.exists():
    raise UserError(f"{meta['kind']} tokenizer in {workdir} is incomplete: {model_path} is missing")
  return from_metadata(meta, model_path.read_bytes(), add_missing)


def grow_vocab(params: dict, old_vocab_size: int, new_vocab_size: int) -> dict:
  """A copy of a model's params (`lm.model.Transformer`'s "params" collection) for `new_vocab_size` ids.

  The embedding `embed` [V, D] gets new_vocab_size - old_vocab_size rows appended, and the output
  head `head` [D, V] (absent when tied to the embedding) as many columns, each the mean of the
  existing ones, so a token added to the tokenizer (`Tokenizer.added`) starts as an average token.
  Other leaves are the same arrays. The new arrays are the caller's to place on its shardings.
  """
  assert params["embed"].shape[0] == old_vocab_size <= new_vocab_size, (params["embed"].shape, old_vocab_size)
  if new_vocab_size == old_vocab_size:
    return params
  new = new_vocab_size - old_vocab_size
  embed_VxD = params["embed"]
  mean_1xD = jnp.mean(embed_VxD, axis=0, keepdims=True, dtype=jnp.float32).astype(embed_VxD.dtype)
  grown = {**params, "embed": jnp.concatenate([embed_VxD, jnp.repeat(mean_1xD, new, axis=0)], axis=0)}
  if "head" in params:
    head_DxV = params["head"]
    mean_Dx1 = jnp.mean(head_DxV, axis=1, keepdims=True, dtype=jnp.float32).astype(head_DxV.dtype)
    grown["head"] = jnp.concatenate([head_DxV, jnp.repeat(mean_Dx1, new, axis=1)], axis=1)
  return grown
