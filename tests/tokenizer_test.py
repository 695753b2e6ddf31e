import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lm import config, tokenizer
from lm.errors import UserError

SAMPLES = [
  'def f(x, y=2):\n\t"""Doc."""\n    return {x: [y ** 10, 3.14]}  # comment\n',
  "中文字符 and emoji 😀👨\u200d👩 and e\u0301 combining, \u00a0nbsp, \u3000 wide space",
  "tabs\t\there\r\nCRLF\r\n\n\n  runs   of    spaces   \n\n\n",
  "",
  " ",
  "\n",
  "\u2581 sentencepiece's own space mark \u2581\u2581",
  "<|user|> markers in text are plain text <eos> <pad>",
  "\x00\x0b\x0c\x1c\u2028\x85 control characters",
  "x" * 10_000 + "\n" + "long line without breaks " * 500,
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  root = Path(sysconfig.get_paths()["stdlib"])
  names = ["os.py", "argparse.py", "dataclasses.py", "textwrap.py", "json/decoder.py"]
  return [(root / n).read_text() for n in names]


@pytest.fixture(scope="module")
def sp_tokenizer(corpus) -> tokenizer.Tokenizer:
  cfg = config.default_config()
  cfg.tokenizer.vocab_size = 1000
  return tokenizer.train_tokenizer(cfg, corpus)


@pytest.fixture(params=["sentencepiece", "byte"])
def tok(request, sp_tokenizer) -> tokenizer.Tokenizer:
  return sp_tokenizer if request.param == "sentencepiece" else tokenizer.ByteTokenizer()


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
  assert tok.decode(tok.encode([text])[0]) == text


def test_batch_encoding_equals_one_by_one(tok):
  assert tok.encode(SAMPLES) == [tok.encode([s])[0] for s in SAMPLES]


def test_special_ids_are_fixed(tok):
  assert (tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID) == (0, 1, 2)
  expected = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
  assert tokenizer.special == {name: i for i, name in enumerate(expected)}
  ids = tok.encode(SAMPLES)
  assert min(min(x) for x in ids if x) >= len(expected)  # text never yields a special id
  assert max(max(x) for x in ids if x) < tok.vocab_size
  hi = tok.encode(["hi"])[0]
  user, end = tokenizer.special["<|user|>"], tokenizer.special["<|end|>"]
  assert tok.decode([1, 0, user, *hi, end, 2, 0]) == "<|user|>hi<|end|>"


def test_kinds_and_vocab_sizes(sp_tokenizer):
  assert tokenizer.ByteTokenizer().vocab_size == 263
  assert sp_tokenizer.kind == "sentencepiece" and sp_tokenizer.vocab_size == 1000


def test_sentencepiece_compresses_code(sp_tokenizer, corpus):
  ids = sp_tokenizer.encode(corpus[:1])[0]
  assert len(corpus[0].encode()) / len(ids) > 2.5


def test_token_bytes_count_utf8_bytes(tok, corpus):
  assert tok.token_bytes.shape == (tok.vocab_size,) and tok.token_bytes.dtype == np.int32
  assert not tok.token_bytes[: len(tokenizer.special)].any()
  for text in SAMPLES + corpus[:1]:
    assert tok.token_bytes[tok.encode([text])[0]].sum() == len(text.encode())


def test_invalid_utf8_decodes_with_replacement():
  byte_ids = [0xFF + len(tokenizer.special), ord("a") + len(tokenizer.special)]
  assert tokenizer.ByteTokenizer().decode(byte_ids) == "\ufffda"


def test_save_and_load_give_identical_encodings(tok, tmp_path):
  tok.save(tmp_path)
  loaded = tokenizer.load_tokenizer(tmp_path)
  assert (loaded.kind, loaded.vocab_size) == (tok.kind, tok.vocab_size)
  assert loaded.encode(SAMPLES) == tok.encode(SAMPLES)
  assert (tmp_path / "tokenizer.model").exists() == (tok.kind == "sentencepiece")


def test_bytes_round_trip(tok):
  restored = tokenizer.Tokenizer.from_bytes(tok.to_bytes())
  assert restored.kind == tok.kind
  assert restored.encode(SAMPLES) == tok.encode(SAMPLES)
  assert np.array_equal(restored.token_bytes, tok.token_bytes)


def test_vocab_too_large_is_a_user_error(corpus):
  cfg = config.default_config()
  cfg.tokenizer.vocab_size = 50_000
  with pytest.raises(UserError, match="tokenizer.vocab_size=50000 is too large"):
    tokenizer.train_tokenizer(cfg, corpus[:1])


def test_train_bytes_bounds_the_training_text(corpus):
  lines = list(tokenizer.training_sentences(corpus, 10_000))
  size = sum(len(x.encode()) for x in lines)
  assert 10_000 <= size < 10_000 + 4 * tokenizer.CHUNK_CHARS
  assert "".join(lines) == corpus[0][: len("".join(lines))]


def test_missing_tokenizer_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="tokenizer.json is missing"):
    tokenizer.load_tokenizer(tmp_path)
  tokenizer.ByteTokenizer().save(tmp_path)
  (tmp_path / "tokenizer.json").write_text('{"kind": "sentencepiece"}')
  with pytest.raises(UserError, match="tokenizer.model is missing"):
    tokenizer.load_tokenizer(tmp_path)
