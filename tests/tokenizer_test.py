import dataclasses
import io
import json
import sysconfig
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import sentencepiece

from lm import config, tokenizer
from lm.errors import UserError
from lm.model import ModelConfig, Transformer

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
  expected = ["<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>"]
  assert tokenizer.special == tok.special == {name: i for i, name in enumerate(expected)}
  assert tok.added == () and tok.loaded_vocab_size == tok.vocab_size
  ids = tok.encode(SAMPLES)
  assert min(min(x) for x in ids if x) >= len(expected)  # text never yields a special id
  assert max(max(x) for x in ids if x) < tok.vocab_size
  hi = tok.encode(["hi"])[0]
  user, end = tokenizer.special["<|user|>"], tokenizer.special["<|end|>"]
  assert tok.decode([1, 0, user, *hi, end, 2, 0]) == "<|user|>hi<|end|>"


def test_kinds_and_vocab_sizes(sp_tokenizer):
  assert tokenizer.ByteTokenizer().vocab_size == 264
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


OLD_SPECIAL = {name: i for i, name in enumerate(tokenizer.SPECIAL_TOKENS[:7])}  # before <|tool|> existed


def old_sentencepiece_model(corpus) -> bytes:
  """A sentencepiece model trained as lm did before <|tool|>: 7 reserved specials, <unk> at 7."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=tokenizer.training_sentences(corpus, 1_000_000),
    max_sentence_length=4 * tokenizer.CHUNK_CHARS,
    model_writer=model,
    model_type="bpe",
    vocab_size=500,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=7,
    pad_piece="<pad>",
    bos_piece="<bos>",
    eos_piece="<eos>",
    control_symbols=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    minloglevel=2,
  )
  return model.getvalue()


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_a_tokenizer_without_the_tool_token_loads_with_it_added_at_the_end(kind, corpus, tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  if kind == "byte":
    vocab = 263
  else:
    model = old_sentencepiece_model(corpus)
    (old / "tokenizer.model").write_bytes(model)
    vocab = sentencepiece.SentencePieceProcessor(model_proto=model).vocab_size()
  (old / "tokenizer.json").write_text(json.dumps({"kind": kind, "vocab_size": vocab, "special": OLD_SPECIAL}))
  tok = tokenizer.load_tokenizer(old)
  assert tok.special == {**OLD_SPECIAL, "<|tool|>": vocab}
  assert (tok.vocab_size, tok.loaded_vocab_size, tok.added) == (vocab + 1, vocab, ("<|tool|>",))
  assert tok.token_bytes.shape == (vocab + 1,) and tok.token_bytes[vocab] == 0
  ids = tok.encode(SAMPLES)
  assert min(min(x) for x in ids if x) >= 7 and max(max(x) for x in ids if x) < vocab  # the trained ids, as before
  if kind == "byte":
    assert tok.encode(["a"]) == [[ord("a") + 7]]
  for text, text_ids in zip(SAMPLES, ids, strict=True):
    assert tok.decode(text_ids) == text
  assert tok.decode([vocab, *tok.encode(["hi"])[0], 6]) == "<|tool|>hi<|end|>"
  assert tokenizer.load_tokenizer(old, add_missing=False).vocab_size == vocab

  tok.save(tmp_path / "new")  # the added token is recorded: the saved tokenizer has it at the same id
  saved = json.loads((tmp_path / "new" / "tokenizer.json").read_text())
  assert saved["added"] == ["<|tool|>"] and saved["vocab_size"] == vocab + 1
  again = tokenizer.load_tokenizer(tmp_path / "new")
  assert again.special == tok.special and again.added == ("<|tool|>",)
  assert again.vocab_size == again.loaded_vocab_size == vocab + 1
  assert again.encode(SAMPLES) == ids and np.array_equal(again.token_bytes, tok.token_bytes)
  assert tokenizer.Tokenizer.from_bytes(tok.to_bytes()).special == tok.special


def test_a_tokenizer_without_bos_at_1_is_a_user_error(tmp_path):
  special = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
  (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "byte", "vocab_size": 259, "special": special}))
  with pytest.raises(UserError, match="has <bos> at id 2; lm needs it at id 1"):
    tokenizer.load_tokenizer(tmp_path)


@pytest.mark.parametrize("tied", [False, True])
def test_grow_vocab_appends_mean_rows_and_keeps_the_old_logits(tied):
  cfg = ModelConfig(vocab_size=263, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, tie_embeddings=tied)
  tokens_BxT = np.random.default_rng(0).integers(0, 263, (2, 6)).astype(np.int32)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens_BxT)["params"])
  grown = tokenizer.grow_vocab(params, 263, 265)
  assert grown["embed"].shape == (265, 16)
  np.testing.assert_array_equal(grown["embed"][:263], params["embed"])
  for row in (263, 264):
    np.testing.assert_allclose(grown["embed"][row], params["embed"].mean(axis=0), rtol=1e-5, atol=1e-7)
  assert ("head" in grown) == (not tied)
  if not tied:
    assert grown["head"].shape == (16, 265)
    np.testing.assert_array_equal(grown["head"][:, :263], params["head"])
    for column in (263, 264):
      np.testing.assert_allclose(grown["head"][:, column], params["head"].mean(axis=1), rtol=1e-5, atol=1e-7)
  assert grown["layer_0"] is params["layer_0"]
  old_logits_BxTxV = Transformer(cfg).apply({"params": params}, tokens_BxT)
  new_model = Transformer(dataclasses.replace(cfg, vocab_size=265))
  np.testing.assert_allclose(new_model.apply({"params": grown}, tokens_BxT)[..., :263], old_logits_BxTxV, atol=1e-5)
  ends_in_new_ids = np.concatenate([tokens_BxT[:1], tokens_BxT[:1]]).copy()
  ends_in_new_ids[:, -1] = [263, 264]  # equal rows: the model sees both new tokens alike
  logits_BxTxV = new_model.apply({"params": grown}, ends_in_new_ids)
  np.testing.assert_allclose(logits_BxTxV[0, -1], logits_BxTxV[1, -1], atol=1e-6)
  assert tokenizer.grow_vocab(params, 263, 263) is params
