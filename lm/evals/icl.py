"""Built-in tasks that need the context window: few-shot rule induction, key-value recall, counting.

Each is generated from a fixed seed, so every run is scored on the same examples. Two are multiple choice by
log-likelihood, which shows a small model's partial knowledge where exact match shows none:
- `rule_induction`: a made-up word and its image under a hidden rule (reverse, upper-case, letters sorted,
  first letter moved to the end), e.g. `plorm -> mrolp`; the choices are the word's four images (chance
  0.25). The shots share the example's rule (`group_field`), so only the context tells the model which rule
  it is: accuracy against shots is in-context learning. Reported per rule too.
- `kv_recall`: eight `key=value` lines, then one key asked for; the choices are the eight values (chance
  0.125), and the asked pair sits at a depth of 0, 0.25, 0.5, 0.75 or 1 through the lines (0: the first).
  The context is working memory: accuracy against depth (`acc/depth=D`). `kv_recall_long`: 32 lines.
- `counting`: a run of one letter repeated 1 to 9 times, and its count (`b b b -> 3`), written by the model
  (exact match; chance about 0.11 for a model that writes a digit).
- `docstrings`: bits per byte on the standard library's docstrings (the run's held-out ones): prose, beside
  a code model's training text.
"""

import dataclasses

import numpy as np

from lm.evals.tasks import Task

RULES = {
  "reverse": lambda w: w[::-1],
  "upper": str.upper,
  "sort": lambda w: "".join(sorted(w)),
  "rotate": lambda w: w[1:] + w[0],
}
CONSONANTS, VOWELS = "bcdfghjklmnprstvz", "aeiou"


def made_up_words(n: int, rng: np.random.Generator) -> list[str]:
  """n distinct pronounceable words of 4 or 5 letters (consonant-vowel patterns), none a palindrome."""
  words = set()
  while len(words) < n:
    pattern = ("cvcvc", "cvccv", "cvcv", "ccvcv")[rng.integers(4)]
    word = "".join(rng.choice(list(CONSONANTS if c == "c" else VOWELS)) for c in pattern)
    if word != word[::-1] and len(set(word)) > 2:
      words.add(word)
  return sorted(words)


def rule_induction(per_rule: int = 50, seed: int = 0) -> Task:
  rng = np.random.default_rng(seed)
  words = [w for w in made_up_words(per_rule * len(RULES) * 2, rng) if len({fn(w) for fn in RULES.values()}) == 4]
  # Interleaved (one example of each rule in turn), so that --limit N keeps every rule.
  examples = [
    {
      "word": (w := words[k * per_rule + i]),
      "rule": rule,
      "choices": [f(w) for f in RULES.values()],
      "answer": k,
    }
    for i in range(per_rule)
    for k, rule in enumerate(RULES)
  ]
  return Task(
    name="rule_induction",
    kind="multiple_choice",
    examples=tuple(examples),
    prompt="{word} ->",
    fewshot_separator="\n",
    group_field="rule",
    report_by="rule",
  )


DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def kv_recall(pairs: int = 8, per_depth: int = 40, seed: int = 0) -> Task:
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(per_depth):
    for depth in DEPTHS:  # interleaved, so that --limit N keeps every depth
      keys = rng.choice([a + b for a in CONSONANTS for b in VOWELS], size=pairs, replace=False)
      values = [str(v) for v in rng.choice(np.arange(100, 1000), size=pairs, replace=False)]
      asked = round(depth * (pairs - 1))
      lines = "\n".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
      examples.append({"pairs": lines, "key": str(keys[asked]), "choices": values, "answer": asked, "depth": depth})
  return Task(
    name="kv_recall",
    kind="multiple_choice",
    examples=tuple(examples),
    prompt="{pairs}\n{key} =",
    fewshot_separator="\n\n",
    report_by="depth",
  )


def counting(n: int = 180, seed: int = 0) -> Task:
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(n):
    count, letter = int(rng.integers(1, 10)), str(rng.choice(list(CONSONANTS)))
    examples.append({"items": " ".join([letter] * count), "answer": str(count)})
  return Task(
    name="counting",
    kind="generate",
    examples=tuple(examples),
    prompt="{items} ->",
    target=" {answer}",
    fewshot_separator="\n",
    stop=("\n",),
    max_new_tokens=4,
  )


def docstrings() -> Task:
  return Task(name="docstrings", kind="perplexity", source="stdlib_docstrings")


def kv_recall_long() -> Task:
  """kv_recall over 32 lines (about 230 bytes: for contexts of 256 tokens and more)."""
  return dataclasses.replace(kv_recall(pairs=32), name="kv_recall_long")


BUILTIN = {
  "rule_induction": rule_induction,
  "kv_recall": kv_recall,
  "kv_recall_long": kv_recall_long,
  "counting": counting,
  "docstrings": docstrings,
}
ABOUT = {
  "rule_induction": "few-shot: a made-up word under a hidden rule the shots share (acc of 4 choices, per rule)",
  "kv_recall": "working memory: the value of one of 8 key=value lines (acc of 8 choices, per depth)",
  "kv_recall_long": "kv_recall with 32 lines, for contexts of 256 tokens and more (acc of 32 choices, per depth)",
  "counting": "a run of one letter, 1 to 9 times: its count (exact_match)",
  "docstrings": "bits per byte on the standard library's held-out docstrings",
}
