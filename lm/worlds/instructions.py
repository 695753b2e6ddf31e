"""A generated instruction world: short tasks whose answers a program checks, and a hidden preference.

Tasks (`TASKS`), each asked in 3 or 4 phrasings (`Task.phrasings`), on inputs drawn from 56 short
lowercase words (`WORDS`), small numbers or random letter strings:
  reverse    "Reverse these words: cat dog sun"         -> "sun dog cat"      (3-5 words)
  sort       "Put these words in alphabetical order: .." -> the words sorted   (3-4 words)
  count      "Count the words: cat dog sun"             -> "3"                (3-8 words)
  upper      "Write in capital letters: cat dog"        -> "CAT DOG"          (2-4 words)
  first/last "What is the first word? cat dog sun"      -> "cat"              (3-6 words)
  add        "What is 12 + 7?"                          -> "19"               (0-20 each)
  backwards  "Spell backwards: qzmf"                    -> "fmzq"             (3-6 random letters)
  repeat     "Repeat owl 3 times."                      -> "owl owl owl"      (a word, 2-4 times)
A prompt and its reply in any style together hold at most `MAX_CHARS` = 112 characters (tested on the
longest inputs), so a conversation fits in 128 byte tokens with room for the chat markers.

Split: an input (the word list, number pair, ...) is held out when a hash of it falls in
`HELDOUT_PERCENT`% of the hash range, whatever the seed and whatever the task. Held-out inputs never
appear in training text (pre-training, SFT, preference pairs); every phrasing appears in both splits,
so held-out prompts are new inputs in known phrasings (no phrasing is held out).

Answer styles (`STYLES`): "bare" `X`, "label" `Answer: X`, "sentence" `The answer is X.`. The SFT
conversations use the three in equal numbers, assigned at random (independent of task and phrasing),
so an SFT model samples each about a third of the time and the SFT data says nothing of which is better.

Checker (`score`): exact match with the answer after normalisation: surrounding whitespace stripped,
runs of whitespace made one space, a leading `The answer is` or `Answer:` removed, then one final
period and the spaces around the rest. Case counts (the upper task needs it). Any style scores.

Hidden preference (`judge`): replies are ranked lexicographically by (correct, in the "sentence"
style); a higher rank wins (1.0), equal ranks tie (0.5). So correctness dominates, and between
equally correct replies the preferred style wins. A policy that always answers correctly in the
preferred style wins 5/6 of comparisons against an always-correct SFT model (which picks the
preferred style a third of the time); if both are correct with probability p, independently, its win
rate is 5/6 - (2/3) p (1 - p): 0.83 at p = 1, 0.73 at p = 0.8, 0.67 at p = 0.5. Compare samples at
temperature 1: greedy decoding turns the SFT model's three-way coin into one fixed style.

Preference pairs (`preference_pairs`): chosen is the correct answer in the preferred style; rejected
is, with probability `WRONG_SHARE`, a plausible wrong answer (`wrong_answer`) in any of the three
styles, else the correct answer in one of the two other styles.

Files (`write_world`), JSON lines, all deterministic from the seed:
  pretrain.jsonl     {"id", "text"}: documents of `Q: <prompt>\\nA: <bare answer>` blocks (train inputs;
                     no chat markers); read with `data.source=jsonl:DIR/pretrain.jsonl`.
  sft_train.jsonl    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} (train inputs).
  sft_eval.jsonl     the same format on the held-out examples.
  prefs_train.jsonl  {"prompt", "chosen", "rejected"}: TRL's standard format, the prompt being the user
                     message and chosen/rejected the assistant replies (train inputs).
  prefs_eval.jsonl   pairs on the held-out examples, for a reward model's accuracy.
  prompts_train.jsonl  train examples in eval.jsonl's form, prompts for PPO and GRPO (`data.post_source`;
                     `correct` is the reward a program computes from their answers).
  eval.jsonl         the held-out examples {"task", "phrasing", "args", "prompt", "answer"}, for
                     accuracy and win rates (`read_examples`, `score`, `judge`).
  test.jsonl         more held-out examples in eval.jsonl's form (`test_examples`): none of eval.jsonl's prompts,
                     each prompt once. Settings are chosen on eval.jsonl; test.jsonl is for the final comparison.
"""

import dataclasses
import hashlib
import json
import random
import string
from collections.abc import Callable, Sequence

from etils import epath

from lm.metrics import replace_text

WORDS = (
  "ant", "apple", "bear", "bee", "bird", "bread", "cake", "cat", "cloud", "corn", "cow", "deer", "dog", "duck",
  "egg", "fig", "fish", "fox", "frog", "goat", "grape", "hen", "honey", "horse", "jam", "kiwi", "lemon", "lime",
  "lion", "melon", "moon", "mouse", "nut", "olive", "owl", "pear", "pig", "plum", "rain", "rat", "rice", "river",
  "salt", "sea", "seal", "sheep", "sky", "snow", "star", "stone", "sun", "tea", "tree", "wind", "wolf", "yak",
)  # fmt: skip
MAX_NUMBER = 20  # add draws both terms from 0..MAX_NUMBER
HELDOUT_PERCENT = 10
STYLES = {"bare": ("", ""), "label": ("Answer: ", ""), "sentence": ("The answer is ", ".")}  # (prefix, suffix)
PREFERRED_STYLE = "sentence"
# Of preference pairs whose rejected reply is wrong, not just in another style. At 0.25 a reward model learned
# the style well enough (0.98 on held-out pairs) but PPO against it traded correct answers for the preferred
# style (29% of sampled replies correct after 80 steps at kl_coef 0.5, SFT's 34%); at 0.5, 31%.
WRONG_SHARE = 0.5
QA_PER_DOCUMENT = 8
MAX_CHARS = 112  # a prompt plus its reply in the longest style


@dataclasses.dataclass(frozen=True)
class Task:
  """One kind of instruction: `draw(rng) -> args`, `solve(args) -> answer`, and the phrasings of the
  user message, `str.format` templates filled with `fields(args)`."""

  name: str
  phrasings: tuple[str, ...]
  draw: Callable[[random.Random], tuple]
  solve: Callable[[tuple], str]
  fields: Callable[[tuple], dict]


@dataclasses.dataclass(frozen=True)
class Example:
  """An instruction and its answer: `prompt` is the user message, `answer` the bare correct reply."""

  task: str
  phrasing: int
  args: tuple
  prompt: str
  answer: str


def _words(low: int, high: int) -> Callable[[random.Random], tuple]:
  return lambda rng: tuple(rng.sample(WORDS, rng.randint(low, high)))


def _letters(rng: random.Random) -> tuple:
  return ("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))),)


def _joined(args: tuple) -> dict:
  return {"x": " ".join(args)}


TASKS = {
  t.name: t
  for t in (
    Task(
      "reverse",
      (
        "Reverse these words: {x}",
        "Write the words in reverse order: {x}",
        "Write these words from last to first: {x}",
        "{x} -- reversed?",
      ),
      _words(3, 5),
      lambda a: " ".join(reversed(a)),
      _joined,
    ),
    Task(
      "sort",
      ("Sort these words: {x}", "Put these words in alphabetical order: {x}", "Alphabetize: {x}", "{x} -- sorted?"),
      _words(3, 4),
      lambda a: " ".join(sorted(a)),
      _joined,
    ),
    Task(
      "count",
      ("How many words are there in: {x}", "Count the words: {x}", "How many words? {x}", "{x} -- how many words?"),
      _words(3, 8),
      lambda a: str(len(a)),
      _joined,
    ),
    Task(
      "upper",
      (
        "Write in capital letters: {x}",
        "Uppercase these words: {x}",
        "Make these words upper case: {x}",
        "{x} -- in caps?",
      ),
      _words(2, 4),
      lambda a: " ".join(a).upper(),
      _joined,
    ),
    Task(
      "first",
      ("What is the first word? {x}", "Give the first word of: {x}", "{x} -- first word?"),
      _words(3, 6),
      lambda a: a[0],
      _joined,
    ),
    Task(
      "last",
      ("What is the last word? {x}", "Give the last word of: {x}", "{x} -- last word?"),
      _words(3, 6),
      lambda a: a[-1],
      _joined,
    ),
    Task(
      "add",
      ("What is {a} + {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?", "{a} plus {b} is?"),
      lambda rng: (rng.randint(0, MAX_NUMBER), rng.randint(0, MAX_NUMBER)),
      lambda a: str(a[0] + a[1]),
      lambda a: {"a": a[0], "b": a[1]},
    ),
    Task(
      "backwards",
      ("Spell backwards: {w}", "Write the letters of {w} in reverse order.", "{w} -- spelled backwards?"),
      _letters,
      lambda a: a[0][::-1],
      lambda a: {"w": a[0]},
    ),
    Task(
      "repeat",
      ("Repeat {w} {n} times.", "Say {w} {n} times.", "Write the word {w} {n} times.", "{w}, {n} times?"),
      lambda rng: (rng.choice(WORDS), rng.randint(2, 4)),
      lambda a: " ".join([a[0]] * a[1]),
      lambda a: {"w": a[0], "n": a[1]},
    ),
  )
}


def _rng(seed: int, *streams: str) -> random.Random:
  """A generator for one named use of the seed (str seeds are hashed by `random`, not by `hash`)."""
  return random.Random("/".join([str(seed), *streams]))


def is_heldout(args: Sequence) -> bool:
  """Whether the input `args` belongs to the held-out split: a hash of the input alone, for every task."""
  digest = hashlib.sha256(json.dumps(list(args)).encode()).digest()
  return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def make_example(task: str, args: Sequence, phrasing: int) -> Example:
  """The example of `task` on input `args` asked in phrasing number `phrasing`."""
  t, args = TASKS[task], tuple(args)
  return Example(task, phrasing, args, t.phrasings[phrasing].format(**t.fields(args)), t.solve(args))


def sample_examples(seed: int, n: int, split: str, stream: str = "sft") -> list[Example]:
  """`n` examples on inputs of `split` ("train" or "eval"), the tasks in equal numbers (to within
  one), phrasings uniform, in random order. Different `stream` names give independent draws."""
  assert split in ("train", "eval"), split
  rng = _rng(seed, split, stream)
  names = list(TASKS)
  out = []
  for i in range(n):
    task = TASKS[names[i % len(names)]]
    args = task.draw(rng)
    while is_heldout(args) != (split == "eval"):
      args = task.draw(rng)
    out.append(make_example(task.name, args, rng.randrange(len(task.phrasings))))
  rng.shuffle(out)
  return out


def test_examples(seed: int, n: int, exclude: Sequence[Example] = ()) -> list[Example]:
  """Held-out examples for a final comparison: `n` drawn in a stream of their own, each prompt kept once and
  none of `exclude`'s (the examples settings were chosen on). Tasks with few held-out inputs (a tenth of add's 441
  and of repeat's 168) come out fewer than the others."""
  seen, out = {e.prompt for e in exclude}, []
  for e in sample_examples(seed, n, "eval", "test"):
    if e.prompt not in seen:
      seen.add(e.prompt)
      out.append(e)
  return out


def render(answer: str, style: str) -> str:
  """The reply that gives `answer` in `style` (a key of `STYLES`)."""
  prefix, suffix = STYLES[style]
  return prefix + answer + suffix


def parse(reply: str) -> tuple[str, str]:
  """(style, normalised answer) of a reply; the style is read from its prefix alone, "bare" if none."""
  text = " ".join(reply.split())
  style = next((s for s in ("sentence", "label") if text.startswith(STYLES[s][0].rstrip())), "bare")
  body = text[len(STYLES[style][0].rstrip()) :].strip()
  return style, body.removesuffix(".").strip()


def score(example: Example, reply: str) -> bool:
  """Whether `reply` answers `example` correctly, in any style (see the module docstring)."""
  return parse(reply)[1] == example.answer


def _rank(example: Example, reply: str) -> tuple[bool, bool]:
  return score(example, reply), parse(reply)[0] == PREFERRED_STYLE


def correct(prompt, response: str, metadata: dict) -> float:
  """A reward a program computes (`rl.reward_fn = "lm.worlds.instructions:correct"`): 1.0 for a response that
  answers correctly (`score`, any style), else 0.0. `metadata` is an example record's (prompts_train.jsonl,
  eval.jsonl), which holds the answer."""
  del prompt
  return float(parse(response)[1] == metadata["answer"])


def partial(prompt, response: str, metadata: dict) -> float:
  """A graded reward a program computes (`rl.reward_fn = "lm.worlds.instructions:partial"`): 1.0 for a correct
  response (`correct`), else half the share of the answer's units in their place: words for an answer of
  several words, letters or digits for one of a single word or number, over the longer of the two sequences.
  So a wrong response scores below 0.5, and one closer to the answer scores more: a group of GRPO replies
  that are all wrong still ranks them, where `correct` gives them one score and the group teaches nothing."""
  del prompt
  got, want = parse(response)[1], metadata["answer"]
  if got == want:
    return 1.0
  units_want, units_got = want.split(), got.split()
  if len(units_want) == 1:
    units_want, units_got = list(want), list(got)
  matches = sum(a == b for a, b in zip(units_want, units_got, strict=False))
  return 0.5 * matches / max(len(units_want), len(units_got), 1)


def judge(example: Example, reply_a: str, reply_b: str) -> float:
  """1.0 if the hidden rule prefers `reply_a` to `reply_b`, 0.0 if it prefers `reply_b`, 0.5 for a tie."""
  a, b = _rank(example, reply_a), _rank(example, reply_b)
  return 1.0 if a > b else 0.5 if a == b else 0.0


def win_rate(examples: Sequence[Example], replies_a: Sequence[str], replies_b: Sequence[str]) -> float:
  """The mean of `judge` over examples: how often a's reply beats b's, ties counting half."""
  assert len(examples) == len(replies_a) == len(replies_b) > 0
  return sum(map(judge, examples, replies_a, replies_b)) / len(examples)


def wrong_answer(example: Example, rng: random.Random) -> str:
  """A plausible wrong answer: a number off by one or two; a word list with one word dropped, two
  neighbours swapped or left in lower case; a single word reversed, cut, with a doubled last letter or
  replaced by another word of the input."""
  answer = example.answer
  if answer.isdigit():
    candidates = [str(int(answer) + d) for d in (-2, -1, 1, 2) if int(answer) + d >= 0]
  else:
    words = answer.split()
    if len(words) > 1:
      candidates = [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
      candidates += [" ".join(words[:i] + [words[i + 1], words[i]] + words[i + 2 :]) for i in range(len(words) - 1)]
    else:
      candidates = [answer[::-1], answer[:-1], answer + answer[-1], *example.args]
    candidates.append(answer.lower())
  return rng.choice(sorted({c for c in candidates if c != answer}))


def conversations(examples: Sequence[Example], seed: int) -> list[dict]:
  """SFT records `{"messages": [user, assistant]}`: the styles in equal numbers (to within one), in an
  order drawn at random, so the style is independent of the task and phrasing."""
  rng = _rng(seed, "styles")
  styles = [list(STYLES)[i % len(STYLES)] for i in range(len(examples))]
  rng.shuffle(styles)
  return [
    {
      "messages": [
        {"role": "user", "content": e.prompt},
        {"role": "assistant", "content": render(e.answer, style)},
      ]
    }
    for e, style in zip(examples, styles, strict=True)
  ]


def preference_pairs(examples: Sequence[Example], seed: int, wrong_share: float = WRONG_SHARE) -> list[dict]:
  """TRL-style `{"prompt", "chosen", "rejected"}` records, one per example: chosen is the correct answer
  in the preferred style; rejected a wrong answer in any style (probability `wrong_share`), else the
  correct answer in another style."""
  rng = _rng(seed, "pairs")
  others = [s for s in STYLES if s != PREFERRED_STYLE]
  pairs = []
  for e in examples:
    if rng.random() < wrong_share:
      rejected = render(wrong_answer(e, rng), rng.choice(list(STYLES)))
    else:
      rejected = render(e.answer, rng.choice(others))
    pairs.append({"prompt": e.prompt, "chosen": render(e.answer, PREFERRED_STYLE), "rejected": rejected})
  return pairs


def pretraining_documents(seed: int, n_documents: int) -> list[str]:
  """Plain-text documents of `QA_PER_DOCUMENT` blocks `Q: <prompt>\\nA: <answer>` (bare answers, train
  inputs), separated by blank lines: the world's words and tasks without any chat marker."""
  examples = sample_examples(seed, n_documents * QA_PER_DOCUMENT, "train", "pretrain")
  blocks = [f"Q: {e.prompt}\nA: {e.answer}" for e in examples]
  return ["\n\n".join(blocks[i : i + QA_PER_DOCUMENT]) for i in range(0, len(blocks), QA_PER_DOCUMENT)]


def example_record(example: Example) -> dict:
  """The JSON object of an example in eval.jsonl."""
  return {**dataclasses.asdict(example), "args": list(example.args)}


def read_examples(path) -> list[Example]:
  """The examples of an eval.jsonl file written by `write_world`."""
  lines = epath.Path(path).read_text().splitlines()
  return [Example(**{**r, "args": tuple(r["args"])}) for r in map(json.loads, lines)]


def write_world(
  directory,
  seed: int = 0,
  n_train: int = 10_000,
  n_eval: int = 500,
  n_pairs: int = 5_000,
  n_pretrain: int = 5_000,
  n_prompts: int = 5_000,
  n_test: int = 8_000,
) -> dict[str, epath.Path]:
  """Writes the world's files into `directory` (see the module docstring) and returns their paths by name:
  pretrain (`n_pretrain` documents), sft_train (`n_train` conversations), prefs_train (`n_pairs` pairs,
  drawn apart from the SFT examples), prompts_train (`n_prompts` examples, drawn apart again, for
  reinforcement learning), on the same `n_eval` held-out examples sft_eval, prefs_eval and eval, and test
  (`test_examples` of `n_test` draws, apart from eval's). Each file is replaced whole (written aside, then
  renamed)."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  heldout = sample_examples(seed, n_eval, "eval")
  records = {
    "pretrain": [{"id": f"doc{i}", "text": t} for i, t in enumerate(pretraining_documents(seed, n_pretrain))],
    "sft_train": conversations(sample_examples(seed, n_train, "train"), seed),
    "sft_eval": conversations(heldout, seed),
    "prefs_train": preference_pairs(sample_examples(seed, n_pairs, "train", "pairs"), seed),
    "prefs_eval": preference_pairs(heldout, seed),
    "prompts_train": [example_record(e) for e in sample_examples(seed, n_prompts, "train", "prompts")],
    "eval": [example_record(e) for e in heldout],
    "test": [example_record(e) for e in test_examples(seed, n_test, heldout)],
  }
  paths = {}
  for name, rows in records.items():
    paths[name] = directory / f"{name}.jsonl"
    replace_text(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
  return paths
