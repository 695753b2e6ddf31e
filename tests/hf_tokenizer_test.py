import json
import os
import random
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported; every load here is local
transformers = pytest.importorskip("transformers")

import tokenizers  # noqa: E402  (after the skip: both come with transformers)

from lm import chat, config, hf_tokenizer, tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ["os.py", "argparse.py", "dataclasses.py", "textwrap.py", "json/decoder.py"]
HELD_OUT_FILES = ["shlex.py", "string.py", "heapq.py"]  # code the tokenizer was not trained on
SAMPLES = [
  'def f(x, y=2):\n\t"""Doc."""\n    return {x: [y ** 10, 3.14]}  # comment   \n\t\t  \n',
  "中文字符 and emoji 😀👨\u200d👩 and e\u0301 combining, caf\u00e9 na\u00efve, \u00a0nbsp, \u3000 wide space",
  "مرحبا بالعالم and שלום עולם, right to left",
  "tabs\t\there\r\nCRLF\r\n\n\n  runs   of    spaces   \n\n\n        \n",
  "",
  " ",
  "\n",
  "\r",
  "digits 1234567890 3.14159 2**64=18446744073709551616",
  "\u2581 sentencepiece's own space mark \u2581\u2581 a\u2581b",
  "<0x41><0xE2> byte pieces as text",
  "\x00\x0b\x0c\x1c\u2028\x85 control characters",
  "x" * 10_000 + "\n" + "long line without breaks " * 500,
  "x" * 4095 + " return value",  # lm cuts lines into chunks of 4096 characters
  "\u2581" + "x" * 4095 + " return value",  # and counts them from each U+2581
]
MESSAGES = [
  {"role": "system", "content": "You are terse."},
  {"role": "user", "content": "What is 2 + 2?\n"},
  {"role": "assistant", "content": "4."},
  {"role": "user", "content": "  And in Python?  "},
  {"role": "tool", "content": '{"result": 4}'},
  {"role": "assistant", "content": "print(2 + 2)\n\t# 4 \U0001f600"},
]


@pytest.fixture(scope="module")
def sp_tokenizer() -> tokenizer.Tokenizer:
  cfg = config.default_config()
  cfg.tokenizer.vocab_size = 1000
  return tokenizer.train_tokenizer(cfg, [(STDLIB / n).read_text() for n in TRAIN_FILES])


@pytest.fixture(scope="module")
def texts() -> list[str]:
  return [(STDLIB / n).read_text() for n in HELD_OUT_FILES] + [(REPO / "LICENSE").read_text()] + SAMPLES


@pytest.fixture(params=["byte", "sentencepiece"])
def tok(request, sp_tokenizer) -> tokenizer.Tokenizer:
  return sp_tokenizer if request.param == "sentencepiece" else tokenizer.ByteTokenizer()


@pytest.fixture
def auto(tok, tmp_path):
  """The tokenizer `save_pretrained` wrote, loaded by transformers alone."""
  hf_tokenizer.save_pretrained(tok, tmp_path, model_max_length=2048)
  return transformers.AutoTokenizer.from_pretrained(tmp_path)


def test_encodes_and_decodes_as_lm(tok, auto, texts):
  want = tok.encode(texts)
  assert auto(texts, add_special_tokens=False)["input_ids"] == want
  assert auto(texts)["input_ids"] == [[tok.bos_id, *ids] for ids in want]  # the bos lm's documents start with
  assert [auto.decode(ids) for ids in want] == texts


def test_byte_kind_decodes_invalid_utf8_as_lm(tmp_path):
  tok = tokenizer.ByteTokenizer()
  hf_tokenizer.save_pretrained(tok, tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for raw in [b"Hel\xfflo", b"\xe2\x96A", b"\xf0\x9f\x98", b"\xed\xa0\x80 surrogate", b"\xc0\xaf overlong"]:
    ids = [tok.offset + b for b in raw]
    assert auto.decode(ids) == tok.decode(ids) == raw.decode(errors="replace")


def test_wrong_merge_order_breaks_the_parity_test(sp_tokenizer, texts, monkeypatch):
  merges = hf_tokenizer._merges

  def shuffled(*args):
    out = merges(*args)
    random.Random(0).shuffle(out)
    return out

  monkeypatch.setattr(hf_tokenizer, "_merges", shuffled)
  hf = hf_tokenizer.to_hf(sp_tokenizer)
  got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
  assert sum(a != b for a, b in zip(got, sp_tokenizer.encode(texts), strict=True)) >= len(HELD_OUT_FILES)


def test_marker_text_is_plain_text_when_special_tokens_are_split(tok, auto):
  text = "a <|end|> b<|user|><eos><unk>"
  assert auto(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode([text])[0]
  assert auto(text, add_special_tokens=False)["input_ids"] != tok.encode([text])[0]  # read as special ids


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_gives_lm_chat_ids(tok, auto, generation_prompt):
  got = auto.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt)["input_ids"]
  assert got == chat.render(tok, MESSAGES, generation_prompt=generation_prompt)[0]
  prompt = MESSAGES[:2]
  got = auto.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"]
  assert got == chat.render(tok, prompt, generation_prompt=True)[0]


def test_a_marker_in_a_content_is_text_only_when_sanitized(tmp_path):
  lm_tok = tokenizer.ByteTokenizer()  # byte ids do not depend on where the text is cut
  hf_tokenizer.save_pretrained(lm_tok, tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  messages = [{"role": "user", "content": "say <|end|> now"}, {"role": "assistant", "content": "<|end|>"}]
  want = chat.render(lm_tok, messages)[0]
  assert auto.apply_chat_template(messages, tokenize=True)["input_ids"] != want
  assert auto.apply_chat_template(messages, tokenize=True, sanitize_control_tokens=True)["input_ids"] == want


def test_special_tokens_keep_lm_ids(tok, auto):
  assert auto.convert_tokens_to_ids(list(tok.special)) == list(tok.special.values())
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tokenizer.BOS_ID, tokenizer.EOS_ID, 0)
  assert auto.unk_token == ("<unk>" if tok.kind == "sentencepiece" else None)
  assert auto.model_max_length == 2048
  user, end = tok.special["<|user|>"], tok.special["<|end|>"]
  assert auto.decode([user, *tok.encode(["hi"])[0], end], skip_special_tokens=True) == "hi"


def test_specials_appended_after_the_vocabulary_keep_their_ids(tmp_path):
  reserved = {name: i for i, name in enumerate(tokenizer.SPECIAL_TOKENS[:-1])}  # saved before <|tool|> existed
  tok = tokenizer.ByteTokenizer(reserved)
  tok.add_special(["<|tool|>"])
  hf_tokenizer.save_pretrained(tok, tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert auto.convert_tokens_to_ids("<|tool|>") == tok.special["<|tool|>"] == 7 + 256
  text = "tool output: \u00e9"
  assert auto(text)["input_ids"] == [tok.bos_id, *tok.encode([text])[0]]
  messages = [{"role": "tool", "content": text}, {"role": "assistant", "content": "ok"}]
  assert auto.apply_chat_template(messages, tokenize=True)["input_ids"] == chat.render(tok, messages)[0]


def _imported(vocab_size: int) -> tokenizers.Tokenizer:
  """A GPT-2 style tokenizer.json with <s> and </s>, that adds <s> when encoding, as checkpoints ship them."""
  tk = tokenizers.Tokenizer(tokenizers.models.BPE())
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tk.train_from_iterator([(STDLIB / n).read_text() for n in TRAIN_FILES], trainer)
  tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tk


def test_huggingface_kind_keeps_its_tokens_and_places_appended_specials(tmp_path):
  original = _imported(400)
  # As `lm import hf` holds it: the checkpoint's own bos/eos under lm's names, the chat markers appended after
  # the model's vocabulary, which is larger than the tokenizer's (unused embedding rows).
  model_vocab_size = original.get_vocab_size() + 10
  tok = tokenizer.HuggingFaceTokenizer(
    original.to_str().encode(), {"<pad>": 0, "<bos>": 1, "<eos>": 2}, model_vocab_size
  )
  markers = tokenizer.SPECIAL_TOKENS[3:]
  tok.add_special(markers)
  hf_tokenizer.save_pretrained(tok, tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<s>", "</s>", "<pad>")
  assert auto.convert_tokens_to_ids(list(markers)) == [model_vocab_size + j for j in range(len(markers))]
  texts = [(STDLIB / n).read_text() for n in HELD_OUT_FILES] + SAMPLES
  assert auto(texts)["input_ids"] == [[tok.bos_id, *ids] for ids in tok.encode(texts)]  # one <s>, as lm reads
  assert auto.apply_chat_template(MESSAGES, tokenize=True)["input_ids"] == chat.render(tok, MESSAGES)[0]


def test_config_holds_the_chat_template_and_encodings_start_with_the_bos(tmp_path, sp_tokenizer):
  hf_tokenizer.save_pretrained(sp_tokenizer, tmp_path)
  saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert saved["chat_template"] == hf_tokenizer.CHAT_TEMPLATE
  assert (saved["add_bos_token"], saved["add_eos_token"], saved["clean_up_tokenization_spaces"]) == (True, False, False)
  assert "model_max_length" not in saved
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
  text = "def f(x):\n    return x"
  assert auto(text)["input_ids"] == [sp_tokenizer.bos_id, *sp_tokenizer.encode([text])[0]]  # as lm reads it
  assert auto.apply_chat_template(MESSAGES, tokenize=True)["input_ids"] == chat.render(sp_tokenizer, MESSAGES)[0]
  with pytest.raises(Exception, match="unknown role"):
    auto.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)
