import json
import os
import tempfile

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm import config, tokenizer
from lm.data import corpus_builder, pipeline, sources
from lm.errors import UserError
from lm.tokenizer import BOS_ID, EOS_ID, ByteTokenizer

BYTES = ByteTokenizer()


def make_cfg(tmp_path, source: str, **data):
  cfg = config.default_config()
  cfg.data.source = source
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.data.seq_len = 32
  cfg.train.batch_size = 4
  cfg.train.eval_batches = 3
  cfg.tokenizer.kind = "byte"
  for key, value in data.items():
    cfg.data[key] = value
  return cfg


def write_docs(directory, docs: list[str]) -> str:
  """Writes docs as doc000.txt, doc001.txt, ...; returns the glob that matches them."""
  directory.mkdir(parents=True, exist_ok=True)
  for i, doc in enumerate(docs):
    (directory / f"doc{i:03d}.txt").write_text(doc)
  return str(directory / "*.txt")


def letter_docs(n: int) -> list[str]:
  """n documents of varied lengths; document i is made of one letter, so tokens tell who is who."""
  return [chr(ord("A") + i) * (5 + 13 * i % 71) for i in range(n)]


def texts(source) -> list[str]:
  return [source[i] for i in range(len(source))]


def token_stream(batches: list[dict]) -> np.ndarray:
  """The packed rows of T+1 tokens behind `batches`, concatenated."""
  rows = [np.append(b["inputs"][r], b["targets"][r, -1]) for b in batches for r in range(len(b["inputs"]))]
  return np.concatenate(rows)


def tokens(doc: str) -> list[int]:
  return [BOS_ID, *BYTES.encode([doc])[0], EOS_ID]


def test_text_source_reads_sorted_files_and_replaces_bad_utf8(tmp_path):
  (tmp_path / "b.txt").write_text("second")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.txt").write_bytes(b"bad \xff byte")
  (tmp_path / "a.txt").write_text("first\r\n")
  (tmp_path / "empty.txt").write_text("")
  cfg = make_cfg(tmp_path, f"text:{tmp_path}/**/*.txt")
  assert list(sources.documents(cfg)) == ["first\r\n", "second", "bad \ufffd byte"]


def test_jsonl_source_reads_the_text_field(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two", "x": 1}\n')
  (tmp_path / "b.jsonl").write_text('{"body": "three \\u00e9"}\n')
  cfg = make_cfg(tmp_path, f"jsonl:{tmp_path}/*.jsonl", text_field="body")
  assert list(sources.documents(cfg)) == ["one", "two", "three \u00e9"]


@pytest.mark.parametrize("line", ['{"text": "ok"', '{"other": "x"}', '["text"]'])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line):
  (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
  cfg = make_cfg(tmp_path, f"jsonl:{tmp_path}/a.jsonl")
  with pytest.raises(UserError, match=f"{tmp_path / 'a.jsonl'}:2: "):
    corpus_builder.prepare(cfg)


def test_stdlib_source_with_max_bytes(tmp_path):
  cfg = make_cfg(tmp_path, "stdlib", max_bytes=300_000)
  files = sources.list_files("stdlib")
  assert len(files) > 500 and all(f.endswith(".py") and "site-packages" not in f for f in files)
  docs = list(sources.documents(cfg))
  assert 300_000 - 4 < sum(len(d.encode()) for d in docs) <= 300_000
  assert docs[0] == sources.read_text(files[0])
  splits = corpus_builder.prepare(cfg)
  train, validation = texts(splits["train"]), texts(splits["validation"])
  assert len(train) + len(validation) == len(docs) and validation
  assert sorted(train + validation) == sorted(docs)
  remaining = iter(docs)
  assert all(any(d == other for other in remaining) for d in train)  # train keeps the source's order


def test_max_bytes_cuts_a_single_document(tmp_path):
  text = "0123456789" * 100
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', [text])}", max_bytes=345)
  assert list(sources.documents(cfg)) == [text[:345]]


def test_validation_of_a_single_file_is_its_tail(tmp_path):
  text = "".join(f"line {i}: {'é' * (i % 5)}\n" for i in range(500))
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', [text])}", eval_fraction=0.1)
  splits = corpus_builder.prepare(cfg)
  cut = int(len(text) * 0.9)
  assert texts(splits["train"]) == [text[:cut]]
  assert texts(splits["validation"]) == [text[cut:]]


def test_tail_validation_is_the_last_documents_in_order(tmp_path):
  docs = letter_docs(10)
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', docs)}", eval_fraction=0.25, eval_split="tail")
  splits = corpus_builder.prepare(cfg)
  assert texts(splits["train"]) == docs[:7]
  assert texts(splits["validation"]) == docs[7:]


def test_prepared_corpus_is_reused_until_a_file_changes(tmp_path):
  pattern = write_docs(tmp_path / "src", letter_docs(4))
  cfg = make_cfg(tmp_path, f"text:{pattern}", eval_fraction=0.25, eval_split="tail")
  corpus_builder.prepare(cfg)
  prepared = os.listdir(tmp_path / "cache" / "lm_corpus")
  assert corpus_builder.prepare(cfg)["train"][0] == "A" * 5
  assert os.listdir(tmp_path / "cache" / "lm_corpus") == prepared
  (tmp_path / "src" / "doc000.txt").write_text("changed")
  assert corpus_builder.prepare(cfg)["train"][0] == "changed"
  assert len(os.listdir(tmp_path / "cache" / "lm_corpus")) == 2


def test_preparing_a_corpus_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', letter_docs(4))}")
  assert corpus_builder.prepare(cfg)["train"]
  assert not os.listdir(tmp_path / "tmp")


def test_prepared_corpus_reads_back_as_a_tfds_source(tmp_path):
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', letter_docs(6))}")
  local = corpus_builder.prepare(cfg)
  tfds_cfg = make_cfg(tmp_path, f"tfds:lm_corpus/{corpus_builder.fingerprint(cfg)}:train")
  read = corpus_builder.prepare(tfds_cfg)
  for split in corpus_builder.SPLITS:
    assert texts(read[split]) == texts(local[split])


class OnlyTrain(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS dataset with a single split and a text field named `body`."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    features = tfds.features.FeaturesDict({"body": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, doc in enumerate(letter_docs(10)):
      yield i, {"body": doc}


def test_tfds_source_without_held_out_split_holds_out_by_hash_or_the_tail(tmp_path):
  OnlyTrain(data_dir=str(tmp_path / "cache"), file_format="array_record").download_and_prepare()
  cfg = make_cfg(tmp_path, "tfds:only_train:train", text_field="body", eval_fraction=0.3)
  read = corpus_builder.prepare(cfg)
  held = corpus_builder.held_out(corpus_builder.unit_hash_indices(10), 0.3)
  assert 0 < held.sum() < 10
  assert texts(read["validation"]) == [d for d, h in zip(letter_docs(10), held, strict=True) if h]
  assert texts(read["train"]) == [d for d, h in zip(letter_docs(10), held, strict=True) if not h]
  cfg = make_cfg(tmp_path, "tfds:only_train", text_field="body", eval_fraction=0.2, max_bytes=150, eval_split="tail")
  read = corpus_builder.prepare(cfg)
  docs = letter_docs(10)  # the first 5 reach max_bytes
  assert texts(read["train"]) == docs[:4]
  assert texts(read["validation"]) == docs[4:5]
  cfg.data.text_field = "text"
  with pytest.raises(UserError, match="no field 'text'"):
    corpus_builder.prepare(cfg)


@pytest.mark.parametrize(
  ("source", "message"),
  [
    ("nonsense", "unknown data.source"),
    ("text:", "unknown data.source"),
    ("hf:foo", "unknown data.source"),
    ("text:{tmp}/nothing/*.txt", "matches no files"),
    ("text:{tmp}/empty/*.txt", "is empty"),
    ("tfds:not_a_dataset_xyz", "is not prepared"),
    ("tfds:mnist", "is not prepared"),
    ("text:{tmp}/two/*.txt", "too few to hold out"),
  ],
)
def test_source_errors(tmp_path, source, message):
  write_docs(tmp_path / "empty", ["", ""])
  write_docs(tmp_path / "two", ["a", "b"])
  cfg = make_cfg(tmp_path, source.format(tmp=tmp_path), eval_fraction=0.6, eval_split="tail")
  with pytest.raises(UserError, match=message):
    corpus_builder.prepare(cfg)


def test_training_text_is_bounded_and_spread_over_a_long_document(tmp_path):
  chunk = corpus_builder.SAMPLE_CHUNK_CHARS
  text = "".join(chr(ord("a") + i) * chunk for i in range(10))
  cfg = make_cfg(tmp_path, f"text:{write_docs(tmp_path / 'src', [text])}", eval_fraction=0.05)
  pieces = list(corpus_builder.training_text(cfg, 3 * chunk))
  assert [p[0] for p in pieces] == ["a", "e", "j"]
  assert pieces == list(corpus_builder.training_text(cfg, 3 * chunk))


@pytest.fixture
def letters_cfg(tmp_path):
  """The streamed pipeline on 20 letter documents, the last 4 held out."""
  source = f"text:{write_docs(tmp_path / 'src', letter_docs(20))}"
  return make_cfg(tmp_path, source, eval_fraction=0.2, eval_split="tail", shuffle="window")


def take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def test_train_batch_format(letters_cfg):
  rows_starting_mid_document = 0
  for batch in take(pipeline.make_train_iterator(letters_cfg, BYTES), 12):
    assert list(batch) == ["inputs", "targets", "segment_ids", "positions", "loss_mask"]
    for key, value in batch.items():
      assert value.shape == (4, 32)
      assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
    x, y, seg, pos, mask = batch.values()
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    new_segment = np.diff(seg, axis=1, prepend=0) != 0
    assert (seg >= 1).all() and (np.diff(seg, axis=1) >= 0).all() and (seg[:, 0] == 1).all()
    np.testing.assert_array_equal(pos[new_segment], 0)
    continues = ~new_segment[:, 1:]
    np.testing.assert_array_equal(pos[:, 1:][continues], pos[:, :-1][continues] + 1)
    starts_within_row = new_segment & (np.arange(32) > 0)
    assert (x[starts_within_row] == BOS_ID).all()
    np.testing.assert_array_equal(mask == 0, (y == BOS_ID) | (x == EOS_ID))
    rows_starting_mid_document += int((x[:, 0] != BOS_ID).sum())
  assert rows_starting_mid_document > 0


def test_padding_is_masked():
  docs = [np.arange(10, 15, dtype=np.int32), np.arange(20, 23, dtype=np.int32)]
  packed = pipeline.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 6)
  batch = pipeline.to_batch(next(iter(packed.batch(2))))
  np.testing.assert_array_equal(batch["inputs"], [[10, 11, 12, 13, 14], [21, 22, 0, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[11, 12, 13, 14, 20], [22, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 4], [0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])


def test_train_iterator_is_deterministic_and_seeded(letters_cfg):
  first = take(pipeline.make_train_iterator(letters_cfg, BYTES), 6)
  again = take(pipeline.make_train_iterator(letters_cfg, BYTES), 6)
  letters_cfg.train.seed = 1
  reseeded = take(pipeline.make_train_iterator(letters_cfg, BYTES), 6)
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
  assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(first, reseeded, strict=True))


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("steps", [0, 1, 5, 17])
def test_resume_from_json_state_is_exact(letters_cfg, steps, window):
  letters_cfg.data.seq_len = 8  # many rows per document, so states fall mid-document
  letters_cfg.data.shuffle_window = window  # 7 rows: states fall mid-window too
  reference = pipeline.make_train_iterator(letters_cfg, BYTES)
  take(reference, steps)
  state = json.loads(json.dumps(reference.get_state()))
  expected = take(reference, 25)  # more than an epoch of the 16 training documents
  resumed = pipeline.make_train_iterator(letters_cfg, BYTES)
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 25), strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_row_shuffle_spreads_a_document_over_batches(letters_cfg):
  letters_cfg.data.seq_len = 8

  def documents_per_batch(window: int) -> float:
    letters_cfg.data.shuffle_window = window
    batches = take(pipeline.make_train_iterator(letters_cfg, BYTES), 40)
    return np.mean([len({t for t in b["inputs"].ravel() if t > EOS_ID}) for b in batches])

  # Unshuffled, a batch's 4 consecutive rows mostly come from one or two long documents.
  assert documents_per_batch(0) < 2.2 < 3.0 < documents_per_batch(256)


def test_processes_read_disjoint_records(letters_cfg):
  letters_cfg.data.seq_len, letters_cfg.data.shuffle_window = 256, 8
  seen = []
  for index in range(2):
    batches = take(pipeline.make_train_iterator(letters_cfg, BYTES, index, 2), 4)
    assert all(b["inputs"].shape == (2, 256) for b in batches)
    letters = {chr(t - 8) for b in batches for t in b["inputs"].ravel() if t > EOS_ID}
    seen.append(letters)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {d[0] for d in letter_docs(16)}
  with pytest.raises(UserError, match=r"16 documents, fewer than data.shards \(17\)"):
    pipeline.make_train_iterator(letters_cfg, BYTES, 0, 17)


def test_global_batch_and_positions_do_not_depend_on_the_process_count(letters_cfg):
  letters_cfg.data.shards, letters_cfg.data.shuffle_window = 4, 16
  one = pipeline.make_train_iterator(letters_cfg, BYTES, 0, 1)
  two = [pipeline.make_train_iterator(letters_cfg, BYTES, p, 2) for p in range(2)]
  for _ in range(3):
    whole, halves = next(one), [next(it) for it in two]
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
  # The positions of both processes together resume one process, and the other way round.
  merged = {"shards": {**two[0].get_state()["shards"], **two[1].get_state()["shards"]}}
  assert merged == one.get_state() and sorted(merged["shards"]) == ["0", "1", "2", "3"]
  resumed_one = pipeline.make_train_iterator(letters_cfg, BYTES, 0, 1)
  resumed_one.set_state(merged)
  resumed_two = pipeline.make_train_iterator(letters_cfg, BYTES, 1, 2)
  resumed_two.set_state(one.get_state())
  expected = next(one)
  np.testing.assert_array_equal(next(resumed_one)["inputs"], expected["inputs"])
  half = expected["inputs"].shape[0] // 2
  np.testing.assert_array_equal(next(resumed_two)["inputs"], expected["inputs"][half:])
  with pytest.raises(UserError, match="3 processes cannot split"):
    pipeline.make_train_iterator(letters_cfg, BYTES, 0, 3)


def test_global_batch_makes_jax_arrays(letters_cfg):
  batch = pipeline.make_eval_set(letters_cfg, BYTES).batches[0]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  arrays = pipeline.global_batch(batch, sharding)
  assert set(arrays) == set(batch)
  for key, value in arrays.items():
    assert isinstance(value, jax.Array) and value.dtype == batch[key].dtype
    np.testing.assert_array_equal(np.asarray(value), batch[key])


def test_sentencepiece_tokenizer_trained_on_the_corpus_feeds_the_pipeline(tmp_path):
  cfg = make_cfg(tmp_path, "stdlib", max_bytes=200_000, eval_fraction=0.1)
  cfg.tokenizer.kind, cfg.tokenizer.vocab_size = "sentencepiece", 500
  tok = tokenizer.train_tokenizer(cfg, corpus_builder.training_text(cfg, 100_000))
  rows = pipeline.tokens.Rows(pipeline.tokens.token_file(cfg, tok, "validation"), cfg.data.seq_len)
  stream = np.concatenate([rows[r]["tokens"][:-1] for r in range(len(rows))]).tolist()
  text = tok.decode(stream[: stream.index(EOS_ID)])
  assert stream[0] == BOS_ID and text
  assert corpus_builder.prepare(cfg)["validation"][0] == text
  assert pipeline.make_eval_set(cfg, tok).tokens > 0
