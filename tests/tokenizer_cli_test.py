"""`lm tokenizer train|stats` and `lm tokenize`, run in-process on a corpus of seven standard-library files."""

import html.parser
import json
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from etils import epath

from lm import config as config_lib
from lm import hf_tokenizer, tokenizer_cli
from lm import tokenizer as tokenizer_lib
from lm import workdir as workdir_lib
from lm.data import corpus_builder
from lm.errors import UserError

from conftest import TINY, run_lm, write_experiment

FILES = ["os.py", "argparse.py", "dataclasses.py", "textwrap.py", "json/decoder.py", "string.py", "shlex.py"]
TEXT = 'def greet(name):\n\t"""Say <b>hi</b> & co."""\n    return f"café {name} 😀"\r\n'


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
  """(source, the --config override that shares one prepared copy of it between the tests)."""
  root = tmp_path_factory.mktemp("corpus")
  for name in FILES:
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, root / name.replace("/", "_"))
  return f"text:{root}/*.py", f"--config.data.cache_dir={root / 'cache'}"


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[str, str]:
  """(a sentencepiece tokenizer of 500 tokens trained by `lm tokenizer train`, what the command printed)."""
  out = tmp_path_factory.mktemp("tok") / "sp500"
  source, cache = corpus
  args = ["tokenizer", "train", "--source", source, "--kind", "sentencepiece", "--vocab-size", 500, "--out", out]
  return str(out), run_lm(*args, cache).stdout


def source_config(corpus, **values):
  cfg = config_lib.default_config()
  config_lib.apply_override(cfg, corpus[1].removeprefix("--config."))
  cfg.data.source = corpus[0]
  for key, value in values.items():
    config_lib.set_key(cfg, key, value)
  return cfg


def test_train_saves_a_tokenizer_that_loads_and_round_trips(trained, corpus):
  out, printed = trained
  tok = tokenizer_lib.load_tokenizer(out)
  assert (tok.kind, tok.vocab_size) == ("sentencepiece", 500)
  assert sorted(p.name for p in Path(out).iterdir()) == ["tokenizer.json", "tokenizer.model"]
  for text in [TEXT, Path(tokenizer_cli.__file__).read_text(), "\u2581 \x00 中文"]:
    assert tok.decode(tok.encode([text])[0]) == text
  # Trained on the whole train split (it is below tokenizer.train_bytes), by the code a run trains with.
  train = corpus_builder.prepare(source_config(corpus))["train"]
  split_bytes = sum(len(train[i].encode()) for i in range(len(train)))
  match = re.fullmatch(
    r"sentencepiece tokenizer of 500 tokens, trained on ([\d,]+) bytes of \S+ in [\d.]+ s: \S+\n", printed
  )
  assert match and int(match[1].replace(",", "")) == split_bytes
  same, _ = workdir_lib.train_new_tokenizer(source_config(corpus, **{"tokenizer.vocab_size": 500}))
  assert same.to_bytes() == tok.to_bytes()


def test_train_byte_kind_a_byte_budget_and_refusals(corpus, tmp_path):
  source, cache = corpus
  printed = run_lm("tokenizer", "train", "--source", source, "--kind", "byte", "--out", tmp_path / "b", cache).stdout
  assert printed.startswith("byte tokenizer of 264 tokens, trained on 0 bytes")
  assert tokenizer_lib.load_tokenizer(tmp_path / "b").encode(["é"]) == [[0xC3 + 8, 0xA9 + 8]]
  args = ["tokenizer", "train", "--source", source, "--vocab-size", 400, "--max-bytes", 60_000, cache]
  assert "trained on 60,000 bytes" in run_lm(*args, "--out", tmp_path / "s").stdout
  for extra, message in [
    (["--out", tmp_path / "s"], "already holds a tokenizer"),
    (["--out", tmp_path / "t", "--vocab-size", 7], "tokenizer.vocab_size must be in"),
    (["--out", tmp_path / "t", "--vocab-size", 100_000], "too large for this training text"),
    (["--out", tmp_path / "t", "--vocab-size", 300], "is too small for this training text"),
    (["--out", tmp_path / "t", "--source", "txt:x"], "unknown data.source"),
  ]:
    failed = run_lm(*args, *extra, check=False)
    assert failed.returncode == 2 and message in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
  assert not (tmp_path / "t").exists()


def test_a_run_with_tokenizer_path_uses_that_tokenizer_and_keeps_it_on_resume(corpus, tmp_path):
  # Trained on less text than a run trains on, so that it differs from the one the run would train.
  out = tmp_path / "sp500"
  run_lm(
    "tokenizer", "train", "--source", corpus[0], "--vocab-size", 500, "--max-bytes", 50_000, "--out", out, corpus[1]
  )
  values = {
    **TINY,
    "data.source": corpus[0],
    "tokenizer.kind": "sentencepiece",
    "tokenizer.vocab_size": 500,
    "train.steps": 2,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
  }
  experiment = write_experiment(tmp_path / "exp.py", **values)
  workdir = tmp_path / "run"
  run_lm(
    "train", "--config", experiment, "--workdir", workdir, corpus[1], f"--config.tokenizer.path={out}", "--no-progress"
  )
  used, given = tokenizer_lib.load_tokenizer(workdir), tokenizer_lib.load_tokenizer(out)
  assert used.to_bytes() == given.to_bytes()
  assert used.encode([TEXT]) == given.encode([TEXT])
  # Resuming ignores tokenizer.path, even one that is gone: the run keeps the tokenizer it saved.
  cfg = config_lib.load_config(experiment, [corpus[1].removeprefix("--config."), "tokenizer.path=/gone"])
  assert workdir_lib.train_new_tokenizer(cfg)[0].encode([TEXT]) != given.encode([TEXT])  # what it would train
  path = workdir_lib.check_workdir(cfg, str(workdir))
  assert workdir_lib.load_or_train_tokenizer(cfg, path).to_bytes() == given.to_bytes()
  cfg.train.init_from = str(workdir)  # a run from another's params takes that run's tokenizer
  with pytest.raises(UserError, match="set tokenizer.path or train.init_from, not both"):
    workdir_lib.load_or_train_tokenizer(cfg, epath.Path(tmp_path / "new"))
  cfg.tokenizer.path = ""
  for source in (str(workdir), f"{workdir}/checkpoints/2"):  # a run directory, and a branch of its checkpoint
    cfg.train.init_from = source  # (its config's data would train the other tokenizer above)
    assert workdir_lib.load_or_train_tokenizer(cfg, epath.Path(tmp_path / "new")).to_bytes() == given.to_bytes()
  tokenizer_lib.ByteTokenizer().save(tmp_path / "byte")
  for path, message in [
    (tmp_path / "nothing", "tokenizer.path: no tokenizer in"),
    (tmp_path / "byte", "holds a byte tokenizer of 264 tokens, not the configured sentencepiece tokenizer of 500"),
  ]:
    args = ["--workdir", tmp_path / "new", corpus[1], f"--config.tokenizer.path={path}"]
    failed = run_lm("train", "--config", experiment, *args, check=False)
    assert failed.returncode == 2 and message in failed.stderr and "tokenizer.path" in failed.stderr, failed.stderr
  assert not (tmp_path / "new").exists()


@pytest.fixture(params=["sentencepiece", "byte"])
def tok_dir(request, trained, tmp_path) -> str:
  if request.param == "sentencepiece":
    return trained[0]
  tokenizer_lib.ByteTokenizer().save(tmp_path / "byte")
  return str(tmp_path / "byte")


def test_tokenize_json_ids_are_the_encoding_and_pieces_join_to_the_text(tok_dir, tmp_path):
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  shown = json.loads(run_lm("tokenize", "--tokenizer", tok_dir, TEXT, "--json").stdout)
  assert shown["ids"] == tok.encode([TEXT])[0]
  assert "".join(shown["pieces"]) == TEXT and len(shown["pieces"]) == len(shown["ids"])
  # The emoji is not in either vocabulary: four byte tokens, the character belonging to the last.
  emoji = [i for i, piece in enumerate(shown["pieces"]) if "😀" in piece]
  assert [shown["pieces"][i] for i in range(emoji[0] - 3, emoji[0] + 1)] == ["", "", "", "😀"]
  (tmp_path / "t.txt").write_text(TEXT, newline="")
  from_file = json.loads(run_lm("tokenize", "--workdir", tok_dir, "--file", tmp_path / "t.txt", "--json").stdout)
  assert from_file == shown


def test_tokenize_shows_pieces_and_ids_with_visible_whitespace(tmp_path):
  tokenizer_lib.ByteTokenizer().save(tmp_path / "byte")
  printed = run_lm("tokenize", "--tokenizer", tmp_path / "byte", "if x:\n\té").stdout
  # Byte ids are the byte's value + 8 (the specials come first).
  assert printed.splitlines() == [
    "[i|113] [f|110] [␣|40] [x|128] [:|66] [↵|18]",
    "[⇥|17] [<0xC3>|203] [<0xA9>|177]",
    "9 tokens for 9 bytes: 1.00 bytes per token (byte tokenizer of 264 tokens)",
  ]
  tok = tokenizer_lib.load_tokenizer(tmp_path / "byte")
  coloured = tokenizer_cli.render_terminal(tok, tok.encode(["ab"])[0], color=True)
  backgrounds = re.findall(r"\x1b\[30;48;5;(\d+)m", coloured)
  assert len(set(backgrounds)) == 2 and backgrounds[0] != backgrounds[1]
  assert re.sub(r"\x1b\[[\d;]*m", "", coloured) == "a105b106"


class TokenSpans(html.parser.HTMLParser):
  """The (title, text) of every <span title=...> of a page; text inside nested elements counts."""

  def __init__(self):
    super().__init__()
    self.spans, self.depth, self.tags = [], 0, []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    if tag == "span":
      self.spans.append([dict(attrs)["title"], ""])
      self.depth += 1

  def handle_endtag(self, tag):
    if tag == "span":
      self.depth -= 1

  def handle_data(self, data):
    if self.depth:
      self.spans[-1][1] += data


def test_tokenize_html_page_has_a_span_per_token_with_its_id_as_title(tok_dir, tmp_path):
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  page = tmp_path / "page.html"
  assert run_lm("tokenize", "--tokenizer", tok_dir, TEXT, "--html", page).stdout.startswith(f"wrote {page}")
  parser = TokenSpans()
  parser.feed(page.read_text())
  parser.close()
  ids = tok.encode([TEXT])[0]
  assert [title for title, _ in parser.spans] == [str(i) for i in ids]
  assert "".join(text for _, text in parser.spans) == TEXT
  assert [text for _, text in parser.spans] == tokenizer_cli.text_pieces(tok, ids)
  assert "b" not in parser.tags and "script" not in parser.tags  # the text's <b> is escaped
  assert page.read_text().count('data-bytes="&lt;0xF0&gt;"') == 1  # the emoji's first byte, labelled


def test_stats_on_held_out_text(trained, corpus, tmp_path):
  source, cache = corpus
  out, _ = trained
  sp = tokenizer_lib.load_tokenizer(out)
  # The same tokenizer run by Hugging Face `tokenizers` (as `lm import hf` would hold it): the same numbers.
  hf_dir = str(tmp_path / "hf")
  tokenizer_lib.HuggingFaceTokenizer(hf_tokenizer.to_hf(sp).to_str().encode(), tokenizer_lib.special, 500).save(hf_dir)
  entries = ["--train", "byte", "--train", "sentencepiece:400", "--train", "sentencepiece:1500", "--tokenizer", out]
  entries += ["--tokenizer", hf_dir]
  rows = json.loads(run_lm("tokenizer", "stats", "--source", source, *entries, "--json", cache).stdout)["tokenizers"]
  assert [r["name"] for r in rows] == ["byte", "sentencepiece:400", "sentencepiece:1500", out, hf_dir]
  byte, small, large, saved, hf = rows
  assert {**hf, "name": out, "kind": "sentencepiece"} == saved
  validation = corpus_builder.prepare(source_config(corpus))["validation"]
  held_out = "".join(validation[i] for i in range(len(validation)))
  assert all(r["bytes"] == len(held_out.encode()) for r in rows)
  assert byte["bytes_per_token"] == 1.0 and byte["fallback_rate"] == 0 and byte["tokens"] == byte["bytes"]
  assert byte["vocab_used"] == len(set(held_out.encode())) / 256
  assert large["bytes_per_token"] > small["bytes_per_token"] > 1.0
  assert (small["vocab_size"], large["vocab_size"]) == (400, 1500)
  # The saved tokenizer's numbers by hand, with sentencepiece itself.
  sp = sentencepiece.SentencePieceProcessor(model_file=str(epath.Path(out) / "tokenizer.model"))
  ids = sp.encode([held_out])[0]
  assert saved["tokens"] == len(ids)
  assert saved["fallback_rate"] == pytest.approx(np.mean([sp.is_byte(i) for i in ids]), abs=1e-12)
  assert saved["vocab_used"] == pytest.approx(len(set(ids)) / (500 - 8), abs=1e-12)
  table = run_lm("tokenizer", "stats", "--source", source, "--train", "byte", cache).stdout.splitlines()
  assert table[1].split() == [
    "tokenizer",
    "kind",
    "vocab",
    "bytes/token",
    "fallback",
    "vocab",
    "used",
    "tokens",
    "bytes",
  ]
  assert table[2].split()[:5] == ["byte", "byte", "264", "1.000", "0.00%"]


@pytest.mark.parametrize(
  "args, message",
  [
    (["tokenizer", "stats", "--source", "stdlib"], "needs at least one --tokenizer DIR or --train"),
    (["tokenizer", "stats", "--source", "stdlib", "--train", "sentencepiece"], "--train takes sentencepiece:VOCAB"),
    (["tokenizer", "stats", "--source", "stdlib", "--train", "bpe:300"], "--train takes sentencepiece:VOCAB"),
    (["tokenize", "--tokenizer", "/nonexistent", "hi"], "no tokenizer in /nonexistent"),
    (["tokenize", "--tokenizer", "/nonexistent"], "needs the text, or --file F"),
    (["tokenize", "hi"], "one of the arguments --workdir --tokenizer is required"),
  ],
)
def test_user_errors_are_one_line(args, message):
  failed = run_lm(*args, check=False)
  assert failed.returncode == 2 and message in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
