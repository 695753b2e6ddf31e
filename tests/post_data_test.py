import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm import chat, config, tokenizer
from lm.data import corpus_builder, post
from lm.errors import UserError
from lm.tokenizer import PAD_ID

BYTES = tokenizer.ByteTokenizer()
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def conversation(i: int) -> list[dict]:
  """Conversation i: lengths vary with i, and its texts name i, so every rendering is unique."""
  turns = [{"role": "user", "content": f"question {i}" + "?" * (i % 5)}]
  turns.append({"role": "assistant", "content": f"answer {i}" + "!" * (i % 7)})
  if i % 3 == 0:
    turns += [{"role": "tool", "content": f"tool {i}"}, {"role": "assistant", "content": f"then {i}"}]
  return turns


def write_jsonl(path, records) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return f"jsonl:{path}"


def make_cfg(tmp_path):
  cfg = config.default_config()
  cfg.data.cache_dir = str(tmp_path / "cache")
  return cfg


def sft_data(tmp_path, n=12, seq_len=48, **kw) -> post.Dataset:
  source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": conversation(i)} for i in range(n)])
  return post.load(make_cfg(tmp_path), BYTES, source, "sft", seq_len, **kw)[0]


def segments(batch: dict) -> list[tuple[list[int], list[float]]]:
  """(ids, target mask of its inputs) of every segment of the batch's rows, in order, checking positions."""
  out = []
  T = batch["inputs"].shape[1]
  for r in range(len(batch["inputs"])):
    seg = batch["segment_ids"][r]
    n = int(seg.max())
    assert list(np.unique(seg[seg > 0])) == list(range(1, n + 1))
    assert not batch["loss_mask"][r][seg == 0].any()
    for s in range(1, n + 1):
      (idx,) = np.nonzero(seg == s)
      assert list(idx) == list(range(idx[0], idx[0] + len(idx)))  # contiguous
      assert list(batch["positions"][r][idx]) == list(range(len(idx)))
      ids = batch["inputs"][r][idx].tolist()
      if idx[-1] == T - 1 and batch["targets"][r][-1] != PAD_ID:
        ids.append(int(batch["targets"][r][-1]))  # the segment fills the row's last slot
      out.append((ids, batch["loss_mask"][r][idx].tolist()))
  return out


def test_sft_batches_pack_whole_conversations_with_the_template_mask(tmp_path):
  data = sft_data(tmp_path, n=12, seq_len=80)  # conversations of 25 to 46 ids: two or three to a row
  assert data.metrics() == {"data/examples": 12, "data/truncated": 0, "data/dropped": 0}
  rendered = {tuple(ids): mask for ids, mask in (chat.render(BYTES, conversation(i)) for i in range(12))}
  it = post.make_iterator(data, batch_size=4, seed=0)
  seen, per_row = [], []
  while len(seen) < 36:  # three epochs
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((4, 80), np.float32 if k == "loss_mask" else np.int32) for k in KEYS
    }
    per_row += batch["segment_ids"].max(axis=1).tolist()
    seen += segments(batch)
  assert sum(n >= 2 for n in per_row) > 0.75 * len(per_row)  # rows pack several conversations
  for ids, target_mask in seen:
    assert tuple(ids) in rendered
    mask = rendered[tuple(ids)]
    assert target_mask == (mask[1:] + [0.0])[: len(target_mask)]  # loss_mask[i] is the mask of targets[i]
  epochs = [[tuple(ids) for ids, _ in seen[e * 12 : (e + 1) * 12]] for e in range(3)]
  assert all(sorted(epoch) == sorted(rendered) for epoch in epochs)  # each epoch has each conversation once
  assert epochs[0] != epochs[1] != epochs[2]  # in a new order


def test_loss_on_all_masks_every_target_of_a_conversation(tmp_path):
  batch = next(post.make_iterator(sft_data(tmp_path, loss_on="all"), batch_size=4, seed=0))
  seg = batch["segment_ids"]
  same = np.zeros_like(seg, dtype=bool)
  same[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  np.testing.assert_array_equal(batch["loss_mask"][:, :-1], same[:, :-1])
  last = next(post.make_iterator(sft_data(tmp_path, loss_on="last"), batch_size=4, seed=0))
  default = next(post.make_iterator(sft_data(tmp_path), batch_size=4, seed=0))
  assert 0 < last["loss_mask"].sum() < default["loss_mask"].sum() < batch["loss_mask"].sum()


def test_iterator_is_deterministic_and_resumes_exactly(tmp_path):
  for data in (sft_data(tmp_path), pair_data(tmp_path)):
    it = post.make_iterator(data, batch_size=4, seed=3)
    for _ in range(7):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"batches": 7}
    expected = [next(it) for _ in range(5)]
    resumed = post.make_iterator(data, batch_size=4, seed=3)
    resumed.set_state(state)
    for want in expected:
      got = next(resumed)
      assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    fresh = [next(post.make_iterator(data, batch_size=4, seed=s)) for s in (3, 3, 4)]
    assert np.array_equal(fresh[0]["inputs"], fresh[1]["inputs"])
    assert not np.array_equal(fresh[0]["inputs"], fresh[2]["inputs"])


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_each_process_reads_its_block_of_the_global_batch(tmp_path, kind):
  data = sft_data(tmp_path) if kind == "sft" else pair_data(tmp_path)
  whole = post.make_iterator(data, batch_size=8, seed=1)
  parts = [post.make_iterator(data, batch_size=8, seed=1, process_index=p, process_count=2) for p in range(2)]
  for _ in range(4):
    batch, local = next(whole), [next(p) for p in parts]
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([part[k] for part in local]), batch[k])
  if kind == "preference":
    with pytest.raises(UserError, match="must be even"):
      post.make_iterator(data, batch_size=6, seed=1, process_count=2)


PAIRS = [
  {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "margin": 2.5},
  {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    "chosen": [{"role": "assistant", "content": "Paris"}],
    "rejected": [{"role": "assistant", "content": "Lyon, I think"}],
  },
  {
    "chosen": [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "bye"},
      {"role": "assistant", "content": "goodbye"},
    ],
    "rejected": [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "bye"},
      {"role": "assistant", "content": "no"},
    ],
    "margin": 1,
  },
  {"prompt": "Say yes", "chosen": "yes", "rejected": "no way"},
]
REPLIES = [("4", "5"), ("Paris", "Lyon, I think"), ("goodbye", "no"), ("yes", "no way")]


def pair_data(tmp_path, seq_len=64, records=PAIRS, **kw) -> post.Dataset:
  source = write_jsonl(tmp_path / "pairs.jsonl", records)
  return post.load(make_cfg(tmp_path), BYTES, source, "preference", seq_len, **kw)[0]


def test_preference_rows_pair_chosen_and_rejected_of_one_prompt(tmp_path):
  data = pair_data(tmp_path)
  batches = [next(post.make_iterator(data, batch_size=8, seed=0))]  # one epoch: the 4 pairs
  batch = batches[0]
  assert batch["margin"].shape == (8,) and batch["margin"].dtype == np.float32
  assert set(np.unique(batch["segment_ids"])) <= {0, 1}
  found = set()
  for i in range(4):
    chosen, rejected = 2 * i, 2 * i + 1
    texts = []
    for r in (chosen, rejected):
      n = int(batch["segment_ids"][r].sum())
      np.testing.assert_array_equal(batch["positions"][r][:n], np.arange(n))
      texts.append(BYTES.decode(batch["targets"][r][batch["loss_mask"][r] > 0]))
    pair_index = REPLIES.index((texts[0].removesuffix("<|end|>"), texts[1].removesuffix("<|end|>")))
    found.add(pair_index)
    assert texts[0].endswith("<|end|>") and texts[1].endswith("<|end|>")
    assert batch["margin"][chosen] == batch["margin"][rejected] == float(PAIRS[pair_index].get("margin", 0))
    # The same prompt: identical ids up to the last assistant marker, and no loss on them.
    assistant = BYTES.special["<|assistant|>"]
    ids = [batch["inputs"][r].tolist() for r in (chosen, rejected)]
    prompt_end = [len(x) - x[::-1].index(assistant) for x in ids]
    assert prompt_end[0] == prompt_end[1] and ids[0][: prompt_end[0]] == ids[1][: prompt_end[1]]
    assert not batch["loss_mask"][chosen][: prompt_end[0] - 1].any()
  assert found == {0, 1, 2, 3}


def test_the_pair_forms_give_the_same_rows(tmp_path):
  forms = [
    {"prompt": "q", "chosen": "a", "rejected": "b"},
    {
      "prompt": [{"role": "user", "content": "q"}],
      "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}],
    },
    {
      "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    },
  ]
  source = write_jsonl(tmp_path / "forms.jsonl", forms)
  data = post.load(make_cfg(tmp_path), BYTES, source, "preference", 32)[0]
  sequences = [[(ids.tolist(), mask.tolist()) for ids, mask in e.sequences] for e in data.examples]
  assert sequences[0] == sequences[1] == sequences[2]
  assert sequences[0][0][0] == chat.render(BYTES, forms[2]["chosen"])[0]


BAD_RECORDS = {
  "invalid JSON": ("sft", '{"messages": [', "invalid JSON"),
  "missing messages": ("sft", {"text": "hi"}, "missing key 'messages'"),
  "not an object": ("sft", [1, 2], "missing key 'messages'"),
  "unknown role": ("sft", {"messages": [{"role": "bot", "content": "x"}]}, "message 0 has unknown role 'bot'"),
  "empty conversation": ("sft", {"messages": []}, "the conversation is empty"),
  "no assistant turn": ("sft", {"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
  "content not a string": (
    "sft",
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["y"]}]},
    "message 1 content is not a string",
  ),
  "missing chosen": ("preference", {"prompt": "q", "rejected": "b"}, "missing key 'chosen'"),
  "missing prompt": ("preference", {"chosen": "a", "rejected": "b"}, "missing key 'prompt'"),
  "prompts differ": (
    "preference",
    {
      "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}],
    },
    "chosen and rejected have different prompts",
  ),
  "no reply at the end": (
    "preference",
    {
      "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "q"}],
    },
    "rejected does not end with an assistant turn",
  ),
  "bad role in chosen": (
    "preference",
    {"prompt": "q", "chosen": [{"role": "ai", "content": "a"}], "rejected": "b"},
    "chosen: message 0 has unknown role 'ai'",
  ),
  "margin not a number": ("preference", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "x"}, "margin"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, case):
  kind, bad, message = BAD_RECORDS[case]
  good = {"messages": conversation(1)} if kind == "sft" else PAIRS[0]
  path = tmp_path / "data.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
  with pytest.raises(UserError, match=message) as e:
    post.load(make_cfg(tmp_path), BYTES, f"jsonl:{path}", kind, 64)
  assert str(e.value).startswith(f"{path}:3: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_overlong_examples_are_truncated_dropped_or_an_error(tmp_path, kind):
  if kind == "sft":
    records = [{"messages": conversation(i)} for i in range(12)]
    lengths = [len(chat.render(BYTES, conversation(i))[0]) for i in range(12)]
  else:
    records = PAIRS
    lengths = [max(len(e.sequences[0][0]), len(e.sequences[1][0])) for e in pair_data(tmp_path, 200).examples]
  seq_len = sorted(lengths)[len(lengths) // 2]  # about half the examples are longer than a row
  over = sum(n > seq_len + 1 for n in lengths)
  assert 0 < over < len(lengths)
  source = write_jsonl(tmp_path / "data.jsonl", records)
  cfg = make_cfg(tmp_path)
  truncated = post.load(cfg, BYTES, source, kind, seq_len, overlong="truncate")[0]
  assert truncated.truncated + truncated.dropped == over
  assert len(truncated.examples) == len(lengths) - truncated.dropped
  assert all(len(ids) <= seq_len + 1 for e in truncated.examples for ids, _ in e.sequences)
  if kind == "sft":
    assert truncated.dropped == 0  # every conversation starts with a short assistant reply
    first = chat.render(BYTES, conversation(0))[0]
    assert sorted(len(e.sequences[0][0]) for e in truncated.examples) == sorted(min(n, seq_len + 1) for n in lengths)
    assert any(e.sequences[0][0].tolist() == first[: seq_len + 1] for e in truncated.examples)
  dropped = post.load(cfg, BYTES, source, kind, seq_len, overlong="drop")[0]
  assert (dropped.truncated, dropped.dropped, len(dropped.examples)) == (0, over, len(lengths) - over)
  assert dropped.metrics("train/") == {
    "train/examples": len(lengths) - over,
    "train/truncated": 0,
    "train/dropped": over,
  }
  line = 1 + next(i for i, n in enumerate(lengths) if n > seq_len + 1)
  with pytest.raises(UserError, match=f"data.jsonl:{line}: .* tokens, more than seq_len \\+ 1"):
    post.load(cfg, BYTES, source, kind, seq_len, overlong="error")


def test_a_pair_truncated_to_no_response_is_dropped(tmp_path):
  long_prompt = {"prompt": "x" * 100, "chosen": "a", "rejected": "b"}
  source = write_jsonl(tmp_path / "data.jsonl", [long_prompt, *PAIRS])
  data = post.load(make_cfg(tmp_path), BYTES, source, "preference", 60)[0]
  assert (len(data.examples), data.dropped) == (4, 1)


def test_the_hash_split_is_stable_and_keeps_a_prompt_together(tmp_path):
  records = [{"id": i, "messages": conversation(i)} for i in range(40)]
  cfg = make_cfg(tmp_path)

  def held_out(records) -> set[str]:
    source = write_jsonl(tmp_path / "split.jsonl", records)
    _, held = post.load(cfg, BYTES, source, "sft", 64, eval_fraction=0.25)
    return {BYTES.decode(e.sequences[0][0]) for e in held.examples}

  expected = {i for i in range(40) if corpus_builder.unit_hash(f"id:{i}") < 0.25}
  assert 0 < len(expected) < 40
  held = held_out(records)
  assert held == {BYTES.decode(chat.render(BYTES, conversation(i))[0]) for i in expected}
  assert held_out(records[::-1]) == held
  assert held_out(records + [{"id": 100 + i, "messages": conversation(100 + i)} for i in range(10)]) >= held
  # Pairs without ids are split by their prompt: every pair of a prompt lands on the same side.
  pairs = [{"prompt": f"prompt {i // 3}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
  source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
  train, held = post.load(cfg, BYTES, source, "preference", 64, eval_fraction=0.3)
  prompts = [{BYTES.decode(e.sequences[0][0]).split("<|end|>")[0] for e in d.examples} for d in (train, held)]
  assert prompts[0] and prompts[1] and not prompts[0] & prompts[1]
  assert len(train.examples) % 3 == 0 and len(train.examples) + len(held.examples) == 60


def test_an_eval_file_gives_the_eval_split(tmp_path):
  cfg = make_cfg(tmp_path)
  train_source = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation(i)} for i in range(10)])
  eval_source = write_jsonl(tmp_path / "eval.jsonl", [{"messages": conversation(i)} for i in range(50, 53)])
  train, held = post.load(cfg, BYTES, train_source, "sft", 64, eval_fraction=0.5, eval_source=eval_source)
  assert (len(train.examples), len(held.examples)) == (10, 3)
  assert post.load(cfg, BYTES, train_source, "sft", 64)[1] is None


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_the_eval_set_holds_every_example_once_in_padded_batches(tmp_path, kind):
  data = sft_data(tmp_path, n=12, seq_len=48) if kind == "sft" else pair_data(tmp_path, records=PAIRS[:3])
  whole = post.make_eval_set(data, batch_size=4)
  assert whole.documents == len(data.examples)
  assert whole.tokens == sum(int(b["loss_mask"].sum()) for b in whole.batches)
  if kind == "sft":
    ids = sorted(tuple(s[0]) for b in whole.batches for s in segments(b))
    assert ids == sorted(tuple(e.sequences[0][0].tolist()) for e in data.examples)
    real_rows = len(post.pack_rows(data.examples, 49))
  else:
    rows = [b["inputs"][r].tolist() for b in whole.batches for r in range(4)]
    for r, e in enumerate(data.examples):
      for which in (0, 1):
        n = len(e.sequences[which][0]) - 1
        assert rows[2 * r + which][:n] == e.sequences[which][0][:-1].tolist()
    assert [b["margin"].tolist() for b in whole.batches] == [[2.5, 2.5, 0, 0], [1, 1, 0, 0]]
    real_rows = 6
  padding = [not b["segment_ids"][r].any() for b in whole.batches for r in range(4)]
  assert padding == [False] * real_rows + [True] * (len(padding) - real_rows) and len(padding) - real_rows < 4
  halves = [post.make_eval_set(data, batch_size=4, process_index=p, process_count=2) for p in range(2)]
  for b, (first, second) in enumerate(zip(halves[0].batches, halves[1].batches, strict=True)):
    for k in whole.batches[b]:
      np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole.batches[b][k])
  assert len(post.make_eval_set(data, batch_size=4, max_batches=1).batches) == 1


class Chats(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS dataset of conversations (`messages`) and one of preference pairs, by builder config."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="sft"), tfds.core.BuilderConfig(name="pairs")]
  code_path = None

  def _info(self):
    message = tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
    if self.builder_config.name == "sft":
      features = {"messages": message}
    else:
      features = {"prompt": tfds.features.Text(), "chosen": message, "rejected": message}
      features["margin"] = tfds.features.Scalar(dtype=np.float32)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      if self.builder_config.name == "sft":
        yield i, {"messages": conversation(i)}
      else:
        reply = [{"role": "assistant", "content": f"good {i}"}], [{"role": "assistant", "content": f"bad {i}"}]
        yield i, {"prompt": f"q {i}", "chosen": reply[0], "rejected": reply[1], "margin": i / 2}


def test_tfds_sources_read_like_jsonl(tmp_path):
  for name in ("sft", "pairs"):
    Chats(config=name, data_dir=str(tmp_path / "cache"), file_format="array_record").download_and_prepare()
  cfg = make_cfg(tmp_path)
  from_tfds = post.load(cfg, BYTES, "tfds:chats/sft:train", "sft", 64)[0]
  from_jsonl = sft_data(tmp_path, n=6, seq_len=64)
  assert [e.sequences[0][0].tolist() for e in from_tfds.examples] == [
    e.sequences[0][0].tolist() for e in from_jsonl.examples
  ]
  pairs = post.load(cfg, BYTES, "tfds:chats/pairs", "preference", 64)[0]
  assert [e.margin for e in pairs.examples] == [i / 2 for i in range(6)]
  chosen, _ = chat.render_continuation(
    BYTES, [{"role": "user", "content": "q 2"}], [{"role": "assistant", "content": "good 2"}]
  )
  assert pairs.examples[2].sequences[0][0].tolist() == chosen
  with pytest.raises(UserError, match="missing key 'messages'"):
    post.load(cfg, BYTES, "tfds:chats/pairs", "sft", 64)
  with pytest.raises(UserError, match="must be jsonl:GLOB or tfds"):
    post.load(cfg, BYTES, "text:x.txt", "sft", 64)
