"""The hash split, the tokenized train split and its global row shuffle, and the eval sets."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
from data_test import BYTES, make_cfg, texts, write_docs

from lm.data import corpus_builder, pipeline, sources, tokens
from lm.errors import UserError
from lm.tokenizer import BOS_ID, EOS_ID


def numbered_docs(n: int, length=lambda i: 20 + 7 * i % 50) -> list[str]:
  """n documents; document i repeats its own 3-letter tag, so any token span tells whose it is."""
  return [(f"{i:03d}" * 2000)[: length(i)] for i in range(n)]


def validation_texts(cfg) -> set[str]:
  return set(texts(corpus_builder.prepare(cfg)["validation"]))


def test_hash_split_is_stable_under_added_and_moved_files(tmp_path):
  docs = numbered_docs(60)
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'a', docs)}", eval_fraction=0.2)
  held = validation_texts(cfg)
  train = set(texts(corpus_builder.prepare(cfg)["train"]))
  assert 4 <= len(held) <= 24 and not held & train and held | train == set(docs)
  # Files added in between (sorted first and last) move no document across the split.
  (tmp_path / "a" / "aaa.txt").write_text("new first")
  (tmp_path / "a" / "zzz.txt").write_text("new last")
  assert validation_texts(cfg) - {"new first", "new last"} == held
  # The same files under another root (another machine) give the same split.
  shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
  moved = make_cfg(tmp_path, f"text:{tmp_path}/elsewhere/b/*.txt", eval_fraction=0.2)
  assert validation_texts(moved) == validation_texts(cfg)


def test_hash_split_of_jsonl_records_follows_ids_not_order(tmp_path):
  records = [{"id": i, "text": f"record {i}"} for i in range(50)]
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  random.Random(0).shuffle(records)
  (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  held = [validation_texts(make_cfg(tmp_path, f"jsonl:{tmp_path}/{f}.jsonl", eval_fraction=0.2)) for f in ("a", "b")]
  assert held[0] == held[1] and 3 <= len(held[0]) <= 20


def test_stdlib_docstrings_hold_out_the_files_stdlib_holds_out(tmp_path):
  cfg = make_cfg(tmp_path, "stdlib_docstrings", max_bytes=400_000, eval_fraction=0.1)
  docs = dict(sources.identified_documents(cfg))
  assert docs and all(not text.lstrip().startswith(("import ", "def ")) for text in docs.values())
  files = {os.path.relpath(f, sources.root("stdlib")) for f in sources.list_files("stdlib")}
  assert set(docs) <= files  # the same identities as the code files, so the same hashes
  held = {i for i in docs if corpus_builder.unit_hash(i) < 0.1}
  assert held and validation_texts(cfg) == {docs[i] for i in held}


def test_hash_split_holds_out_one_document_when_the_fraction_selects_none(tmp_path):
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'a', numbered_docs(3))}", eval_fraction=0.001)
  assert len(validation_texts(cfg)) == 1


@pytest.mark.parametrize(
  ("source", "parsed"),
  [
    ("tfds:c4/en:3.1.0", ("c4", "en", "3.1.0", "")),
    ("tfds:c4/en:3.1.0:validation", ("c4", "en", "3.1.0", "validation")),
    ("tfds:c4:train[:10%]", ("c4", "", "", "train[:10%]")),
    ("tfds:lm_corpus/c123:train", ("lm_corpus", "c123", "", "train")),
  ],
)
def test_tfds_source_parses_name_config_version_and_split(source, parsed):
  assert sources.parse_tfds(source) == parsed


def test_tfds_tpu_experiment_source_parses_as_written():
  from lm.config import load_config  # noqa: PLC0415

  cfg = load_config("experiments/isoflop_tpu.py")
  assert sources.parse_tfds(cfg.data.source) == ("c4", "en", "3.1.0", "")
  with pytest.raises(UserError, match="cannot parse"):
    sources.parse_tfds("tfds:c4/en:3.1:train")


@pytest.fixture
def long_doc_cfg(tmp_path):
  """59 short documents and one long one (about half of all tokens), streamed or globally shuffled."""
  docs = numbered_docs(60, lambda i: 3000 if i == 30 else 40)
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', docs)}", eval_fraction=0.05, eval_split="tail")
  cfg.data.seq_len = 16
  return cfg


def long_doc_batches(batches: list[dict]) -> list[int]:
  """The indices of the batches holding tokens of document 30 (tag '030')."""
  tag = [t + 8 for t in b"030"]  # byte ids are offset by the 8 special tokens
  return [i for i, b in enumerate(batches) if any(tag == list(r[j : j + 3]) for r in b["inputs"] for j in range(14))]


def test_global_shuffle_spreads_a_long_document_over_the_epoch(long_doc_cfg):
  rows = tokens.Rows(tokens.token_file(long_doc_cfg, BYTES, "train"), 16)
  epoch = len(rows) // 4
  long_doc_cfg.data.shuffle_window = 16  # a window much smaller than the epoch, as on a real corpus
  spread = {}
  for shuffle in ("window", "global"):
    long_doc_cfg.data.shuffle = shuffle
    batches = [next(it) for it in [pipeline.make_train_iterator(long_doc_cfg, BYTES)] for _ in range(epoch)]
    where = long_doc_batches(batches)
    spread[shuffle] = (where[-1] - where[0]) / epoch, len(where) / epoch
  # The document fills about half the rows: shuffled globally, its rows are in most batches of the epoch.
  assert spread["global"][0] > 0.9 and spread["global"][1] > 0.8
  assert spread["window"][1] < 0.7 < spread["global"][1]


def test_global_rows_cover_the_train_split_once_per_epoch(tmp_path):
  docs = numbered_docs(30)
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', docs)}", eval_fraction=0.2)
  cfg.data.seq_len, cfg.train.batch_size = 8, 2
  file = tokens.token_file(cfg, BYTES, "train")
  train = texts(corpus_builder.prepare(cfg)["train"])
  expected = np.concatenate([[BOS_ID, *BYTES.encode([d])[0], EOS_ID] for d in train])
  np.testing.assert_array_equal(file.tokens, expected)
  rows = tokens.Rows(file, 8)
  it = pipeline.make_train_iterator(cfg, BYTES)
  epoch = [next(it) for _ in range(len(rows) // 2)]
  targets = sorted(t for b in epoch for r, m in zip(b["targets"], b["loss_mask"], strict=True) for t in r[m > 0])
  # Every target of the split once, but BOS (never a target) and the one target cut by an odd last pair.
  counts = np.bincount(expected[1:], minlength=300) - np.bincount(targets, minlength=300)
  assert counts[BOS_ID] == len(train) - 1 and counts.sum() - counts[BOS_ID] <= 8
  # The epoch's rows are distinct rows of the file: a permutation, no row twice.
  order = [tokens.shuffled_index(i, len(rows), cfg.train.seed) for i in range(len(rows))]
  assert sorted(order) == list(range(len(rows)))
  first_rows = [rows[r]["tokens"][:-1] for r in order[: len(epoch) * 2]]
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in epoch]), np.stack(first_rows))


@pytest.mark.parametrize("steps", [0, 3, 11, 40])
def test_global_iterator_resumes_exactly_and_any_process_count_reads_the_same_batches(long_doc_cfg, steps):
  long_doc_cfg.train.batch_size = 4
  reference = pipeline.make_train_iterator(long_doc_cfg, BYTES)
  for _ in range(steps):
    next(reference)
  state = json.loads(json.dumps(reference.get_state()))
  expected = [next(reference) for _ in range(30)]  # past the end of an epoch for steps = 40
  halves = [pipeline.make_train_iterator(long_doc_cfg, BYTES, p, 2) for p in range(2)]
  for half in halves:
    half.set_state(state)
  for want in expected:
    got = [next(h) for h in halves]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  with pytest.raises(UserError, match="data.shuffle=window"):
    reference.set_state({"shards": {"0": {}}})


def test_global_iterator_reshuffles_every_epoch_and_by_seed(long_doc_cfg):
  long_doc_cfg.train.batch_size = 4
  rows = len(tokens.Rows(tokens.token_file(long_doc_cfg, BYTES, "train"), 16))
  it = pipeline.make_train_iterator(long_doc_cfg, BYTES)
  first = [next(it)["inputs"] for _ in range(rows // 4)]
  it.set_state({"batches": 0})
  assert all((a == b).all() for a, b in zip(first, [next(it)["inputs"] for _ in range(rows // 4)], strict=True))
  it.set_state({"batches": rows // 4 * 2})  # an epoch later (rows / 4 batches per epoch, rounded down)
  assert not (next(it)["inputs"] == first[0]).all()
  long_doc_cfg.train.seed = 1
  assert not (next(pipeline.make_train_iterator(long_doc_cfg, BYTES))["inputs"] == first[0]).all()


def test_eval_set_is_random_rows_of_the_validation_split_and_the_same_for_any_process_count(tmp_path):
  docs = numbered_docs(100, lambda i: 200)
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', docs)}", eval_fraction=0.2)
  cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches = 16, 4, 3
  whole = pipeline.make_eval_set(cfg, BYTES)
  assert len(whole.batches) == 3
  assert whole.tokens == sum(int(b["loss_mask"].sum()) for b in whole.batches)
  held = {d[k : k + 3] for d in validation_texts(cfg) for k in range(3)}  # any 3 letters of a document
  tags = {bytes(t - 8 for t in r[1:4]).decode() for b in whole.batches for r in b["inputs"] if r[0] != BOS_ID}
  assert tags <= held and len(tags) >= 5  # 12 rows from many documents, not the first one or two
  assert 5 <= whole.documents <= 24
  halves = [pipeline.make_eval_set(cfg, BYTES, p, 2) for p in range(2)]
  for b, h0, h1 in zip(whole.batches, halves[0].batches, halves[1].batches, strict=True):
    for key in b:
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), b[key])
  assert halves[0].tokens == whole.tokens


def test_a_small_eval_split_gives_fewer_padded_batches_without_repeats(tmp_path):
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', numbered_docs(10, lambda i: 30))}", eval_fraction=0.1)
  cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches = 8, 4, 10
  held = validation_texts(cfg)
  eval_set = pipeline.make_eval_set(cfg, BYTES)
  targets = sum(len(t) + 1 for t in held)  # every token after BOS, EOS included
  assert eval_set.tokens == targets and eval_set.documents == len(held)
  rows = math.ceil(targets / 8)
  assert len(eval_set.batches) == math.ceil(rows / 4)
  filled = [r.any() for b in eval_set.batches for r in b["segment_ids"]]
  assert filled == [True] * rows + [False] * (len(filled) - rows)  # padding rows only at the end


def test_eval_sources_are_held_out_by_their_own_hash_or_whole(tmp_path):
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'main', numbered_docs(20))}", eval_fraction=0.2)
  other = write_docs(tmp_path / "other", [f"other document {i} " * 5 for i in range(40)])
  cfg.data.eval_sources = (f"held=text:{other}", f"every=all:text:{other}")
  cfg.train.eval_batches = 100  # more than either set holds
  sets = pipeline.make_eval_sets(cfg, BYTES)
  assert list(sets) == ["", "held", "every"]
  assert sets["every"].documents == 40 and 2 <= sets["held"].documents < 20
  cfg.data.eval_sources = ("bad name=stdlib",)
  with pytest.raises(UserError, match="NAME=SOURCE"):
    pipeline.prepare_all(cfg)
  cfg.data.eval_sources = (f"missing=text:{tmp_path}/nothing/*.txt",)
  with pytest.raises(UserError, match="matches no files"):
    pipeline.prepare_all(cfg)


def test_token_file_is_built_once_and_shared(long_doc_cfg, monkeypatch):
  first = tokens.token_file(long_doc_cfg, BYTES, "train")
  monkeypatch.setattr(tokens, "write_token_file", lambda *args: pytest.fail("tokenized twice"))
  again = tokens.token_file(long_doc_cfg, BYTES, "train")
  assert first.tokens.filename == again.tokens.filename
  assert first.documents == len(corpus_builder.prepare(long_doc_cfg)["train"])
  assert first.tokens[0] == BOS_ID and first.tokens[-1] == EOS_ID


def test_hash_fallback_holds_out_one_document_of_duplicates_and_trains_on_the_rest(tmp_path):
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": 7, "text": f"same id {i}"}) + "\n" for i in range(3)))
  cfg = make_cfg(tmp_path, f"jsonl:{tmp_path}/a.jsonl", eval_fraction=0.001)
  splits = corpus_builder.prepare(cfg)
  assert len(splits["validation"]) == 1 and len(splits["train"]) == 2


def test_an_interrupted_tokenization_leaves_no_staging_directory(long_doc_cfg, monkeypatch):
  def fail(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(BYTES, "encode", fail)
  with pytest.raises(KeyboardInterrupt):
    tokens.token_file(long_doc_cfg, BYTES, "train")
  assert not [p for p in os.listdir(tokens.cache_root(long_doc_cfg)) if ".tmp" in p]
