"""lm's tokenizers as Hugging Face ones: a `tokenizers.Tokenizer` (`to_hf`) and a directory that
`transformers.AutoTokenizer.from_pretrained` loads offline with no code of ours (`save_pretrained`).

The exported tokenizer encodes text to the ids `tok.encode` gives and decodes them back, with no special ids
added. lm's special tokens (`tok.special`) are special added tokens at their ids, so a rendered chat
(`CHAT_TEMPLATE`) tokenizes to the ids of `lm.chat.render`. How each kind is rebuilt:

- byte: GPT-2's byte-level alphabet (byte b as one printable character) at ids offset + b, a BPE with no
  merges: every byte is its own id, and invalid UTF-8 decodes with replacement as in lm.
- sentencepiece: a BPE over the model's pieces at their ids, with merges that replay sentencepiece's encoding
  (`_merges`), byte fallback and "<unk>". Its pieces are stored with U+2581 (sentencepiece's space mark) written
  as the space it stands for, so no normalizer is needed and a literal U+2581 in text is not a piece: it falls
  back to its 3 bytes, as lm writes it. The pre-tokenizer cuts where lm cuts the text before sentencepiece
  sees it: around each U+2581, after each line end (`str.splitlines`' boundaries) and every CHUNK_CHARS
  characters of a line.
- huggingface: the imported tokenizer.json as it is, its post-processor replaced by lm's (bos first), its
  appended specials placed at their ids.

Where it differs from lm:
- The text of a special token ("<|end|>", "<eos>", "<unk>") encodes as that special id, as Hugging Face reads
  added tokens in text; `split_special_tokens=True` encodes it as text, as lm does. In a chat content, see
  `CHAT_TEMPLATE`. Decoding writes <bos>, <eos> and <pad> unless `skip_special_tokens=True`; lm always skips them.
- sentencepiece, decoding invalid UTF-8: a run of byte pieces that is not valid UTF-8 decodes to one U+FFFD
  per byte of the run; sentencepiece keeps the valid characters inside it. (Valid text decodes exactly.)
- sentencepiece, encoding, in principle: two pairs that form the same piece cut differently (as "ab" "a" and
  "a" "ba") tie in sentencepiece, which joins the leftmost first, while the merge list ranks the cuts; results
  can differ when the pairs overlap or touch. No text in the tests hits it: encoding matches on all of them
  (code, prose, runs of spaces, CRLF, CJK, emoji, combining and control characters, U+2581, lines over
  CHUNK_CHARS).
"""

import json

import sentencepiece
import tokenizers
from etils import epath
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from lm import chat
from lm.tokenizer import CHUNK_CHARS, SP_SPACE, Tokenizer

LINE_END = "\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]"  # str.splitlines' boundaries (lm.tokenizer.split_lines)
DICT_VOCAB_MODELS = ("BPE", "WordPiece", "WordLevel")  # models whose tokenizer.json vocabulary may skip ids

# `bos_token` comes from tokenizer_config.json. Contents sit between special tokens, so each is encoded
# alone, as lm.chat does. A content that holds a marker's text becomes that special id, unless
# apply_chat_template is given sanitize_control_tokens=True (transformers 5.24): then the marker is text, as
# in lm, but the text around it is encoded in separate pieces, which a sentencepiece tokenizer may split
# differently from lm.
CHAT_TEMPLATE = (
  "{{ bos_token }}"
  "{% for message in messages %}"
  f"{{% if message['role'] not in {list(chat.ROLES)} %}}"
  "{{ raise_exception('unknown role ' + message['role']) }}"
  "{% endif %}"
  "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def to_hf(tok: Tokenizer) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` that encodes and decodes as `tok` does (see the module docstring), with
  `tok.special` as special added tokens at their ids."""
  build = {"byte": _byte, "sentencepiece": _sentencepiece, "huggingface": _huggingface}[tok.kind]
  hf = build(tok)
  contents = {i: hf.id_to_token(i) or name for name, i in tok.special.items()}
  ordered = sorted(contents.items())  # appended specials are added in id order
  hf.add_special_tokens([AddedToken(content, special=True, normalized=False) for _, content in ordered])
  for name, i in tok.special.items():
    assert hf.token_to_id(contents[i]) == i, (name, i, contents[i], hf.token_to_id(contents[i]))
    assert contents[i] == name or tok.kind == "huggingface", (name, contents[i])  # only imports rename
  # `tokenizer(text)` starts with the bos, as lm's documents and prompts do; add_special_tokens=False leaves it out.
  bos = contents[tok.bos_id]
  hf.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.bos_id)]
  )
  return hf


def _byte(tok: Tokenizer) -> tokenizers.Tokenizer:
  """One id per UTF-8 byte: GPT-2's byte-level pre-tokenizer and decoder around a BPE of the 256 byte characters
  and no merges. Its decoder replaces invalid UTF-8 as lm's errors="replace" does, which ByteFallback does not."""
  chars = _byte_chars()
  assert sorted(chars) == sorted(pre_tokenizers.ByteLevel.alphabet()), "not the ByteLevel alphabet"
  vocab = {name: i for name, i in tok.special.items()} | {c: tok.offset + b for b, c in enumerate(chars)}
  assert len(vocab) == tok.vocab_size, (len(vocab), tok.vocab_size)
  hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  hf.decoder = decoders.ByteLevel()
  return hf


def _byte_chars() -> list[str]:
  """The character GPT-2's byte-level alphabet writes for each byte: printable Latin-1 bytes as themselves, the
  others as 256, 257, ... in byte order."""
  printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)}
  others = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def _sentencepiece(tok: Tokenizer) -> tokenizers.Tokenizer:
  """The sentencepiece model as a BPE: pieces at their ids with U+2581 as a space, merges from `_merges`."""
  sp = sentencepiece.SentencePieceProcessor(model_proto=tok.model_bytes())
  vocab, normal = {}, {}
  for i in range(sp.vocab_size()):
    piece = sp.id_to_piece(i)
    if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
      vocab[piece] = i
    else:
      normal[piece.replace(SP_SPACE, " ")] = i
  assert not vocab.keys() & normal.keys(), vocab.keys() & normal.keys()
  vocab |= normal | {name: tok.special[name] for name in tok.added}
  assert sorted(vocab.values()) == list(range(tok.vocab_size)), "the pieces do not fill ids 0..vocab_size-1"
  model = models.BPE(vocab=vocab, merges=_merges(sp, normal), unk_token="<unk>", byte_fallback=True)
  hf = tokenizers.Tokenizer(model)
  hf.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(SP_SPACE, "isolated"),
      pre_tokenizers.Split(Regex(LINE_END), "merged_with_previous"),
      pre_tokenizers.Split(Regex(rf"[\s\S]{{1,{CHUNK_CHARS}}}"), "isolated"),
    ]
  )
  hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  return hf


def _merges(sp: sentencepiece.SentencePieceProcessor, normal: dict[str, int]) -> list[tuple[str, str]]:
  """BPE merges, first to last, that encode as sentencepiece does; `normal` maps its normal pieces to ids.

  Sentencepiece starts from characters and repeatedly joins the adjacent pair whose concatenation is the
  highest-scoring piece (the leftmost on a tie). Hugging Face's BPE repeatedly applies the lowest-ranked merge
  present (the leftmost of that merge); one merge per way of cutting a piece into two pieces, ranked by the
  piece's score, makes it join the same pairs. lm's models score each piece differently, so ties are between
  cuts of one piece only (the module docstring).
  """
  ranked = []
  for piece, i in normal.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in normal and right in normal:
        ranked.append((-sp.get_score(i), i, cut, left, right))
  return [(left, right) for *_, left, right in sorted(ranked)]


def _huggingface(tok: Tokenizer) -> tokenizers.Tokenizer:
  """The imported tokenizer.json without its post-processor (`to_hf` sets lm's); specials appended past its
  vocabulary are put in it at their ids, so a gap (a model vocabulary larger than the tokenizer's) keeps them
  there."""
  data = json.loads(tok.model_bytes().decode())
  data["post_processor"] = None
  if data["model"]["type"] in DICT_VOCAB_MODELS:
    data["model"]["vocab"] |= {name: tok.special[name] for name in tok.added}
  return tokenizers.Tokenizer.from_str(json.dumps(data))


def save_pretrained(tok: Tokenizer, out, model_max_length: int | None = None) -> None:
  """Writes `tokenizer.json` and `tokenizer_config.json` into directory `out` for `AutoTokenizer`.

  The config names bos, eos, pad (and unk when the vocabulary has "<unk>") by `tok`'s ids, sets the chat
  template, starts an encoding with the bos (`tokenizer(text)` gives [bos] + `tok.encode`'s ids, as lm reads a
  document; `add_special_tokens=False` gives `tok.encode`'s ids alone) and does not clean up spaces when
  decoding. Its class, "PreTrainedTokenizerFast", is the plain tokenizers-backed one (transformers
  5 maps the name to TokenizersBackend).
  """
  hf = to_hf(tok)
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tokenizer.json").write_text(hf.to_str(pretty=True))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": hf.id_to_token(tok.special["<bos>"]),
    "eos_token": hf.id_to_token(tok.special["<eos>"]),
    "pad_token": hf.id_to_token(tok.special["<pad>"]),
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "chat_template": CHAT_TEMPLATE,
  }
  if hf.token_to_id("<unk>") is not None:
    config["unk_token"] = "<unk>"
  if model_max_length is not None:
    config["model_max_length"] = model_max_length
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
