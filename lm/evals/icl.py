"""Built-in tasks that need the context window: few-shot rule induction, key-value recall, counting.

Each is generated from a fixed seed, so every run is scored on the same examples:
- `rule_induction`: a made-up word and its image under a hidden rule (reverse, upper-case, letters sorted,
  first letter moved to the end), e.g. `plorm -> mrolp`. The shots share the example's rule
  (`group_field`), so only the context tells the model which rule it is: accuracy against shots is
  in-context learning. Reported per rule too.
- `kv_recall`: eight `key=value` lines, then one key asked for; the asked pair sits at a depth of 0, 0.25,
  0.5, 0.75 or 1 through the lines (0: the first line). The context is working memory: accuracy against
  depth (`exact_match/depth=D`).
- `counting`: a run of one letter repeated 1 to 9 times, and its count (`b b b -> 3`).
- `docstrings`: bits per byte on the standard library's docstrings (the run's held-out ones): prose, beside
  a code model's training text.
"""

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
  words = made_up_words(per_rule * len(RULES), rng)
  # Interleaved (one example of each rule in turn), so that --limit N keeps every rule.
  examples = [
    {"word": words[k * per_rule + i], "rule": rule, "answer": fn(words[k * per_rule + i])}
    for i in range(per_rule)
    for k, (rule, fn) in enumerate(RULES.items())
  ]
  return Task(
    name="rule_induction",
    kind="generate",
    examples=tuple(examples),
    prompt="{word} ->",
    target=" {answer}",
    fewshot_separator="\n",
    stop=("\n",),
    max_new_tokens=12,
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
      values = rng.integers(100, 1000, size=pairs)
      asked = round(depth * (pairs - 1))
      lines = "\n".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
      examples.append({"pairs": lines, "key": str(keys[asked]), "answer": str(values[asked]), "depth": depth})
  return Task(
    name="kv_recall",
    kind="generate",
    examples=tuple(examples),
    prompt="{pairs}\n{key} =",
    target=" {answer}",
    fewshot_separator="\n\n",
    stop=("\n",),
    max_new_tokens=6,
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


BUILTIN = {"rule_induction": rule_induction, "kv_recall": kv_recall, "counting": counting, "docstrings": docstrings}
ABOUT = {
  "rule_induction": "few-shot: a made-up word under a hidden rule the shots share (exact_match, per rule)",
  "kv_recall": "working memory: the value of one of 8 key=value lines, by depth (exact_match, per depth)",
  "counting": "a run of one letter, 1 to 9 times: its count (exact_match)",
  "docstrings": "bits per byte on the standard library's held-out docstrings",
}
