import collections
import json
import random

import pytest

from lm.worlds import instructions as world

SIZES = {"n_train": 300, "n_eval": 60, "n_pairs": 200, "n_pretrain": 20, "n_prompts": 90, "n_test": 400}
OTHER_STYLES = [s for s in world.STYLES if s != world.PREFERRED_STYLE]


def _read(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return world.write_world(tmp_path_factory.mktemp("world"), seed=3, **SIZES)


@pytest.fixture(scope="module")
def examples() -> list[world.Example]:
  return world.sample_examples(0, 900, "train") + world.sample_examples(0, 900, "eval")


class _Longest(random.Random):
  """Draws the longest input a task allows: the most words, the longest ones, the largest numbers."""

  def randint(self, a, b):
    return b

  def sample(self, population, k):
    return sorted(population, key=len, reverse=True)[:k]

  def choice(self, seq):
    return max(seq, key=len)


def test_answers_are_right_on_examples_worked_by_hand():
  cases = {
    ("reverse", ("cat", "dog", "sun")): ("Reverse these words: cat dog sun", "sun dog cat"),
    ("sort", ("pear", "apple", "fig")): ("Sort these words: pear apple fig", "apple fig pear"),
    ("count", ("owl", "sea", "sky", "jam")): ("How many words are there in: owl sea sky jam", "4"),
    ("upper", ("cat", "dog")): ("Write in capital letters: cat dog", "CAT DOG"),
    ("first", ("tea", "wolf", "fish")): ("What is the first word? tea wolf fish", "tea"),
    ("last", ("tea", "wolf", "fish")): ("What is the last word? tea wolf fish", "fish"),
    ("add", (12, 7)): ("What is 12 + 7?", "19"),
    ("backwards", ("qzmf",)): ("Spell backwards: qzmf", "fmzq"),
    ("repeat", ("owl", 3)): ("Repeat owl 3 times.", "owl owl owl"),
  }
  assert {task for task, _ in cases} == set(world.TASKS)
  for (task, args), (prompt, answer) in cases.items():
    example = world.make_example(task, args, 0)
    assert (example.prompt, example.answer) == (prompt, answer)
  assert world.make_example("reverse", ("cat", "dog", "sun"), 3).prompt == "cat dog sun -- reversed?"


def test_every_phrasing_is_distinct_and_carries_the_input():
  for task in world.TASKS.values():
    assert len(task.phrasings) >= 3
    args = task.draw(random.Random(1))
    prompts = [world.make_example(task.name, args, i).prompt for i in range(len(task.phrasings))]
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
      assert all(str(a) in prompt for a in args), (prompt, args)


def test_a_prompt_and_its_longest_reply_fit_in_max_chars():
  for task in world.TASKS.values():
    args = task.draw(_Longest())
    for i in range(len(task.phrasings)):
      example = world.make_example(task.name, args, i)
      longest = max(len(world.render(example.answer, s)) for s in world.STYLES)
      assert len(example.prompt) + longest <= world.MAX_CHARS, example


def test_world_is_deterministic_from_the_seed(tmp_path, files):
  again = world.write_world(tmp_path / "again", seed=3, **SIZES)
  other = world.write_world(tmp_path / "other", seed=4, **SIZES)
  assert (
    set(again)
    == set(files)
    == {"pretrain", "sft_train", "sft_eval", "prefs_train", "prefs_eval", "prompts_train", "eval", "test"}
  )
  for name, path in files.items():
    assert again[name].read_bytes() == path.read_bytes(), name
    assert other[name].read_bytes() != path.read_bytes(), name


def test_split_is_a_hash_of_the_input_shared_by_all_tasks():
  draws = [world.TASKS["reverse"].draw(random.Random(i)) for i in range(5000)]
  share = sum(map(world.is_heldout, draws)) / len(draws)
  assert abs(share - world.HELDOUT_PERCENT / 100) < 0.015
  heldout = next(a for a in draws if world.is_heldout(a))
  assert all(world.is_heldout(heldout) for _ in world.TASKS)  # no seed or task in the key
  for seed in (0, 1):
    train = world.sample_examples(seed, 2000, "train")
    held = world.sample_examples(seed, 500, "eval")
    assert not any(world.is_heldout(e.args) for e in train)
    assert all(world.is_heldout(e.args) for e in held)
    assert not {e.args for e in train} & {e.args for e in held}
    # Held-out prompts are new inputs in known phrasings: every phrasing occurs in both splits.
    assert {(e.task, e.phrasing) for e in train} == {(e.task, e.phrasing) for e in held}


def test_heldout_prompts_never_appear_in_training_files(files):
  eval_prompts = {r["prompt"] for r in _read(files["eval"])}
  assert len(eval_prompts) > 40
  sft = {r["messages"][0]["content"] for r in _read(files["sft_train"])}
  pairs = {r["prompt"] for r in _read(files["prefs_train"])}
  prompts = {r["prompt"] for r in _read(files["prompts_train"])}
  pretrain = "\n".join(r["text"] for r in _read(files["pretrain"]))
  questions = [line[3:] for line in pretrain.splitlines() if line.startswith("Q: ")]
  assert len(questions) == SIZES["n_pretrain"] * world.QA_PER_DOCUMENT
  questions = set(questions)
  for training in (sft, pairs, prompts, questions):
    assert training and not training & eval_prompts


def test_checker_accepts_the_answer_in_every_phrasing_and_style(examples):
  for e in examples[::10]:
    for i in range(len(world.TASKS[e.task].phrasings)):
      example = world.make_example(e.task, e.args, i)
      for style in world.STYLES:
        reply = world.render(example.answer, style)
        assert world.score(example, reply), (example, reply)
        assert world.score(example, f"  \n{reply} \n"), reply
        assert world.score(example, reply.replace(" ", "  ")), reply
      assert world.score(example, example.answer + ".")


def test_checker_rejects_wrong_answers(examples):
  rng = random.Random(0)
  for e in examples:
    wrong = world.wrong_answer(e, rng)
    assert wrong != e.answer and wrong.strip() == wrong and wrong
    for style in world.STYLES:
      assert not world.score(e, world.render(wrong, style)), (e, wrong, style)
    assert not world.score(e, e.answer + " " + e.answer)
    assert not world.score(e, "")
    assert not world.score(e, "The answer is")
  upper = world.make_example("upper", ("cat", "dog"), 0)
  assert not world.score(upper, "cat dog") and not world.score(upper, "Cat Dog")
  assert not world.score(world.make_example("add", (2, 3), 0), "The answer is 5.0.")


def test_judge_ranks_correctness_first_then_the_preferred_style():
  e = world.make_example("reverse", ("cat", "dog", "sun"), 0)
  preferred, label, bare = (world.render(e.answer, s) for s in ("sentence", "label", "bare"))
  assert world.PREFERRED_STYLE == "sentence"
  assert preferred == "The answer is sun dog cat."
  wrong_preferred, wrong_bare = world.render("sun cat dog", "sentence"), "sun cat dog"
  assert world.judge(e, preferred, label) == world.judge(e, preferred, bare) == 1.0
  assert world.judge(e, label, preferred) == 0.0
  assert world.judge(e, label, bare) == world.judge(e, preferred, preferred) == 0.5
  assert world.judge(e, bare, wrong_preferred) == 1.0  # correctness dominates style
  assert world.judge(e, wrong_preferred, wrong_bare) == 1.0  # style still counts among wrong replies
  assert world.judge(e, wrong_bare, "nonsense") == 0.5
  replies = [preferred, label, bare, wrong_preferred, wrong_bare, " The answer is  sun dog cat ."]
  for a in replies:
    for b in replies:
      assert world.judge(e, a, b) + world.judge(e, b, a) == 1.0


def test_win_rate_of_the_preferred_style_against_sft_style_mix_matches_the_docstring(examples):
  rng = random.Random(0)
  for p in (1.0, 0.8, 0.5):

    def sample(style, e, p=p):
      answer = e.answer if rng.random() < p else world.wrong_answer(e, rng)
      return world.render(answer, style or rng.choice(list(world.STYLES)))

    held = [e for e in examples for _ in range(20)]
    dpo_like = [sample(world.PREFERRED_STYLE, e) for e in held]
    sft_like = [sample(None, e) for e in held]
    assert world.win_rate(held, dpo_like, sft_like) == pytest.approx(5 / 6 - 2 / 3 * p * (1 - p), abs=0.01)
    assert world.win_rate(held, sft_like, sft_like) == 0.5


def test_preference_pairs_chosen_beats_rejected(examples):
  pairs = world.preference_pairs(examples * 3, seed=0)
  assert len(pairs) == 3 * len(examples)
  wrong = 0
  rejected_styles = collections.Counter()
  for e, pair in zip(examples * 3, pairs, strict=True):
    assert set(pair) == {"prompt", "chosen", "rejected"} and pair["prompt"] == e.prompt
    assert pair["chosen"] == world.render(e.answer, world.PREFERRED_STYLE)
    assert world.judge(e, pair["chosen"], pair["rejected"]) == 1.0
    if world.score(e, pair["rejected"]):
      rejected_styles[world.parse(pair["rejected"])[0]] += 1
    else:
      wrong += 1
  assert wrong / len(pairs) == pytest.approx(world.WRONG_SHARE, abs=0.03)
  assert set(rejected_styles) == set(OTHER_STYLES)
  assert world.preference_pairs(examples, seed=0) == pairs[: len(examples)]


def test_sft_styles_are_balanced_and_independent_of_the_task():
  examples = world.sample_examples(0, 3001, "train")
  records = world.conversations(examples, seed=0)
  styles = collections.Counter()
  by_task = collections.defaultdict(collections.Counter)
  for e, record in zip(examples, records, strict=True):
    user, assistant = record["messages"]
    assert (user, assistant["role"]) == ({"role": "user", "content": e.prompt}, "assistant")
    assert world.score(e, assistant["content"])
    style = world.parse(assistant["content"])[0]
    assert world.render(e.answer, style) == assistant["content"]
    styles[style] += 1
    by_task[e.task][style] += 1
  assert set(styles.values()) <= {1000, 1001} and set(styles) == set(world.STYLES)
  for task, counts in by_task.items():
    assert sum(counts.values()) in (333, 334)  # tasks in equal numbers
    for style in world.STYLES:
      assert counts[style] / sum(counts.values()) == pytest.approx(1 / 3, abs=0.1), (task, counts)


def test_files_are_in_the_documented_formats(files):
  held = world.sample_examples(3, SIZES["n_eval"], "eval")
  assert world.read_examples(files["eval"]) == held
  for name in ("sft_train", "sft_eval"):
    rows = _read(files[name])
    assert len(rows) == SIZES["n_train" if name == "sft_train" else "n_eval"]
    for row in rows:
      assert list(row) == ["messages"]
      assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
      assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["messages"])
  assert [r["messages"][0]["content"] for r in _read(files["sft_eval"])] == [e.prompt for e in held]
  for name in ("prefs_train", "prefs_eval"):
    rows = _read(files[name])
    assert len(rows) == SIZES["n_pairs" if name == "prefs_train" else "n_eval"]
    assert all(
      list(r) == ["prompt", "chosen", "rejected"] and all(isinstance(v, str) for v in r.values()) for r in rows
    )
  assert [r["prompt"] for r in _read(files["prefs_eval"])] == [e.prompt for e in held]
  prompts = world.read_examples(files["prompts_train"])
  assert len(prompts) == SIZES["n_prompts"] and prompts == world.sample_examples(
    3, SIZES["n_prompts"], "train", "prompts"
  )
  test = world.read_examples(files["test"])
  assert test == world.test_examples(3, SIZES["n_test"], held)
  docs = _read(files["pretrain"])
  assert [d["id"] for d in docs] == [f"doc{i}" for i in range(SIZES["n_pretrain"])]
  for doc in docs:
    blocks = doc["text"].split("\n\n")
    assert len(blocks) == world.QA_PER_DOCUMENT
    assert all(b.startswith("Q: ") and b.count("\nA: ") == 1 for b in blocks)
    assert "<|" not in doc["text"] and "The answer is" not in doc["text"] and "Answer:" not in doc["text"]


def test_test_examples_are_held_out_unique_and_apart_from_the_eval_examples():
  held = world.sample_examples(0, 500, "eval")
  test = world.test_examples(0, 3000, held)
  prompts = [e.prompt for e in test]
  assert len(set(prompts)) == len(prompts) and not set(prompts) & {e.prompt for e in held}
  assert all(world.is_heldout(e.args) for e in test)
  drawn = world.sample_examples(0, 3000, "eval", "test")
  firsts = {}
  for i, e in enumerate(drawn):
    firsts.setdefault(e.prompt, i)
  assert set(prompts) == set(firsts) - {e.prompt for e in held}  # nothing left out but repeats and eval's
  assert [firsts[p] for p in prompts] == sorted(firsts[p] for p in prompts)  # in the order drawn
  kept = collections.Counter(e.task for e in test)
  draws = collections.Counter(e.task for e in drawn)
  assert kept["add"] < draws["add"] / 2 and kept["repeat"] < draws["repeat"] / 2  # few held-out inputs
  assert all(kept[t] > 0.95 * draws[t] for t in ("reverse", "sort", "first", "count"))


def test_the_correct_reward_is_the_checker_on_the_record_answer(files):
  for record in [json.loads(line) for line in files["prompts_train"].read_text().splitlines()][:30]:
    example = world.Example(**{**record, "args": tuple(record["args"])})
    meta = {k: v for k, v in record.items() if k != "prompt"}
    for style in world.STYLES:
      reply = world.STYLES[style][0] + example.answer + world.STYLES[style][1]
      assert world.correct(record["prompt"], reply, meta) == 1.0
    assert world.correct(record["prompt"], example.answer + " x", meta) == 0.0


def test_the_partial_reward_is_one_when_correct_and_below_one_half_by_units_in_place_otherwise():
  words = {"answer": "sun dog cat"}
  assert world.partial(None, "The answer is sun dog cat.", words) == 1.0
  assert world.partial(None, "sun cat dog", words) == pytest.approx(0.5 * 1 / 3)  # one word of three in place
  assert world.partial(None, "sun dog cat cat", words) == pytest.approx(0.5 * 3 / 4)  # over the longer
  assert world.partial(None, "cat dog sun", words) == pytest.approx(0.5 * 1 / 3)
  assert world.partial(None, "", words) == 0.0
  letters = {"answer": "fmzq"}  # one word: its letters are the units
  assert world.partial(None, "fmzx", letters) == pytest.approx(0.5 * 3 / 4)
  assert world.partial(None, "Answer: 18", {"answer": "19"}) == pytest.approx(0.25)
  assert world.partial(None, "Answer: 19", {"answer": "19"}) == 1.0
  # Closer replies score more, and every wrong one less than any right one.
  assert world.partial(None, "sun dog", words) > world.partial(None, "dog", words)
