"""Downstream tasks for `lm eval`: task files, few-shot prompts, and their metrics with standard errors.

A task is a JSON file (a `Task`'s fields) beside its examples, one JSON object per line:

    {"name": "capitals", "kind": "multiple_choice", "examples": "capitals.jsonl",
     "prompt": "Q: What is the capital of {country}?\\nA:", "choices_field": "choices", "answer_field": "answer"}

- `multiple_choice`: the example's choices (`choices_field`, a list of strings) are scored as continuations
  `choice_prefix + choice` of the prompt by log-likelihood. `acc`: the highest log-likelihood is the answer
  (`answer_field`, an index); `acc_norm`: the highest per UTF-8 byte of the choice (the harness divides by
  characters: the same for ASCII choices).
- `generate`: the model writes greedily after the prompt until a `stop` string (or `max_new_tokens`); the
  answer is the text, or the first group of `answer_regex` in it, stripped; `exact_match` compares it with
  `target` (a template over the example's fields, stripped), or `check` ("module:function", called as
  function(prediction, example) -> bool or float) decides.
- `perplexity`: the documents of `source` (any `data.source`; its held-out documents by the run's hash split,
  or all of them with the prefix `all:`) scored whole (`Scorer.loglikelihood_rolling`): `bits_per_byte`,
  `byte_perplexity` and `loss` (nats per token).

Few-shot: with `--shots K`, each test example's prompt follows K solved examples (prompt + target, joined by
`fewshot_separator`), drawn with a seed made of the run's seed and the example's index from
`fewshot_examples` (a separate file) or else from the other test examples: never the example itself. With
`group_field`, the shots share the example's group (a hidden rule, say). With `report_by`, each metric is
also reported per value of that field (`exact_match/depth=0.5`). Templates are Python format strings over
the example's fields. Chat (`chat=True`, for post-trained runs): the shots are user/assistant turns and
the example a user turn, rendered by `lm.chat`; the reply ends at `<|end|>`.

Standard errors are the harness's: the sample standard deviation of the per-example scores over sqrt(n);
for bits per byte, the standard deviation of 200 bootstrap resamples of the documents.
"""

import dataclasses
import importlib
import json
import math
import re

import numpy as np
from etils import epath

from lm import chat
from lm.errors import UserError

KINDS = ("multiple_choice", "generate", "perplexity")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str
  examples: tuple[dict, ...] = ()
  prompt: str = "{prompt}"
  target: str = " {answer}"  # generate: the expected text; also what a shot shows after its prompt
  choices_field: str = "choices"
  answer_field: str = "answer"
  choice_prefix: str = " "
  fewshot_examples: tuple[dict, ...] = ()
  fewshot_separator: str = "\n\n"
  description: str = ""  # text before everything (the first shot or the prompt)
  stop: tuple[str, ...] = ("\n",)
  max_new_tokens: int = 32
  answer_regex: str = ""
  check: str = ""  # "module:function" instead of exact match
  group_field: str = ""
  report_by: str = ""
  source: str = ""  # perplexity: a data.source
  max_documents: int = 0  # perplexity: at most this many documents (0: all)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise UserError(f"task {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
    if self.kind == "perplexity" and not self.source:
      raise UserError(f"task {self.name}: a perplexity task needs a source")
    if self.kind != "perplexity" and not self.examples:
      raise UserError(f"task {self.name} has no examples")


def load_task_file(path: str) -> Task:
  """A task from its JSON definition; `examples` and `fewshot_examples` name JSONL files beside it."""
  file = epath.Path(path)
  try:
    spec = json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read task file {path}: {e}") from None
  if not isinstance(spec, dict):
    raise UserError(f"task file {path} must hold a JSON object")
  fields = {f.name for f in dataclasses.fields(Task)}
  unknown = sorted(set(spec) - fields)
  if unknown:
    raise UserError(f"task file {path}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
  spec.setdefault("name", file.stem)
  for key in ("examples", "fewshot_examples"):
    if isinstance(spec.get(key), str):
      spec[key] = tuple(read_jsonl(file.parent / spec[key]))
  for key in ("stop",):
    if key in spec:
      spec[key] = tuple(spec[key])
  return Task(**spec)


def resolve(name: str) -> Task:
  """The task an entry of `lm eval --tasks` or `train.evals` names: a built-in (`lm.evals.icl`), a task file
  (`*.json`) or `bpb:SOURCE`; `NAME=ENTRY` renames it (how its metrics are logged)."""
  from lm.evals import icl  # noqa: PLC0415  (it builds on this module)

  if "=" in name:
    label, _, entry = name.partition("=")
    return dataclasses.replace(resolve(entry), name=label)
  if name in icl.BUILTIN:
    return icl.BUILTIN[name]()
  if name.startswith("bpb:"):
    return Task(name=name, kind="perplexity", source=name.removeprefix("bpb:"))
  if name.endswith(".json"):
    return load_task_file(name)
  raise UserError(
    f"unknown task {name!r}: built-in tasks are {', '.join(icl.BUILTIN)}; or a task file (*.json), or bpb:SOURCE"
  )


def read_jsonl(path) -> list[dict]:
  path = epath.Path(path)
  if not path.exists():
    raise UserError(f"examples file {path} not found")
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError as e:
        raise UserError(f"{path}:{n}: not JSON: {e}") from None
  return rows


def fill(template: str, example: dict, where: str) -> str:
  try:
    return template.format(**example)
  except (KeyError, IndexError) as e:
    raise UserError(f"{where}: the template {template!r} names {e}, which the example lacks") from None


def gold_text(task: Task, example: dict) -> str:
  """What a shot shows after its prompt: the gold choice (multiple choice) or the target."""
  if task.kind == "multiple_choice":
    return task.choice_prefix + example[task.choices_field][example[task.answer_field]]
  return fill(task.target, example, task.name)


def shots_for(task: Task, index: int, k: int, seed: int) -> list[dict]:
  """The k solved examples shown before test example `index`, never the example itself."""
  if not k:
    return []
  separate = bool(task.fewshot_examples)
  pool = list(task.fewshot_examples) if separate else list(task.examples)
  candidates = [j for j in range(len(pool)) if separate or j != index]
  if task.group_field:
    group = task.examples[index][task.group_field]
    candidates = [j for j in candidates if pool[j][task.group_field] == group]
  if len(candidates) < k:
    raise UserError(f"task {task.name}: {k} shots asked, but example {index} has only {len(candidates)} to draw from")
  rng = np.random.default_rng([seed, index])
  return [pool[j] for j in rng.choice(candidates, size=k, replace=False)]


def prompt_text(task: Task, example: dict, shots: list[dict]) -> str:
  parts = [fill(task.prompt, s, task.name) + gold_text(task, s) for s in shots]
  return task.description + task.fewshot_separator.join([*parts, fill(task.prompt, example, task.name)])


def prompt_ids(tok, task: Task, example: dict, shots: list[dict], use_chat: bool) -> list[int]:
  """The ids before the answer: bos + the few-shot text, or the chat rendering with a generation prompt."""
  if not use_chat:
    return [tok.bos_id] + tok.encode([prompt_text(task, example, shots)])[0]
  messages = [{"role": "system", "content": task.description}] if task.description else []
  for s in shots:
    messages += [
      {"role": "user", "content": fill(task.prompt, s, task.name)},
      {"role": "assistant", "content": gold_text(task, s).strip()},
    ]
  messages.append({"role": "user", "content": fill(task.prompt, example, task.name)})
  return chat.render(tok, messages, generation_prompt=True)[0]


def mean_stderr(scores) -> tuple[float, float]:
  """(mean, sample standard deviation / sqrt(n)) of per-example scores; the error is 0 for one example."""
  x = np.asarray(scores, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def summarise(task: Task, examples: list[dict], scores: dict[str, list[float]]) -> dict:
  """Each metric's mean and stderr, overall and (with `report_by`) per value of that field."""
  out = {}
  for metric, values in scores.items():
    out[metric], out[f"{metric}_stderr"] = mean_stderr(values)
    if task.report_by:
      keys = [e[task.report_by] for e in examples]
      for key in sorted(set(keys), key=lambda v: (str(type(v)), v)):
        picked = [v for v, k in zip(values, keys, strict=True) if k == key]
        out[f"{metric}/{task.report_by}={key}"], out[f"{metric}/{task.report_by}={key}_stderr"] = mean_stderr(picked)
  return out


def checker(task: Task):
  if not task.check:
    return None
  module, _, name = task.check.partition(":")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise UserError(f"task {task.name}: check {task.check!r} cannot be loaded: {e}") from None


def evaluate(scorer, task: Task, shots: int = 0, limit: int = 0, seed: int = 0, use_chat: bool = False) -> dict:
  """{task, shots, n, metrics..., metric_stderr...} and the per-example records, as (summary, samples)."""
  if task.kind == "perplexity":
    return perplexity(scorer, task, limit)
  examples = list(task.examples[:limit] if limit else task.examples)
  tok = scorer.tok
  prompts = [prompt_ids(tok, task, e, shots_for(task, i, shots, seed), use_chat) for i, e in enumerate(examples)]
  samples = []
  if task.kind == "multiple_choice":
    requests, owners = [], []
    for i, (e, p) in enumerate(zip(examples, prompts, strict=True)):
      for choice in e[task.choices_field]:
        text = choice if use_chat else task.choice_prefix + choice
        requests.append((p, tok.encode([text])[0]))
        owners.append((i, len(choice.encode())))
    scored = scorer.loglikelihood(requests)
    per = [[] for _ in examples]
    for (i, n_bytes), (logp, _) in zip(owners, scored, strict=True):
      per[i].append((logp, logp / max(n_bytes, 1)))
    scores = {"acc": [], "acc_norm": []}
    for e, options in zip(examples, per, strict=True):
      gold = e[task.answer_field]
      pick, pick_norm = int(np.argmax([o[0] for o in options])), int(np.argmax([o[1] for o in options]))
      scores["acc"].append(float(pick == gold))
      scores["acc_norm"].append(float(pick_norm == gold))
      samples.append({"example": e, "logprobs": [o[0] for o in options], "pick": pick, "pick_norm": pick_norm})
  else:
    stop_ids = chat.stop_tokens(tok) if use_chat else ()
    outputs = scorer.generate(prompts, task.max_new_tokens, task.stop, stop_ids)
    check = checker(task)
    scores = {"exact_match": []}
    for e, text in zip(examples, outputs, strict=True):
      answer = text
      if task.answer_regex:
        found = re.search(task.answer_regex, text)
        answer = found.group(1) if found else ""
      answer = answer.strip()
      score = float(check(answer, e)) if check else float(answer == fill(task.target, e, task.name).strip())
      scores["exact_match"].append(score)
      samples.append({"example": e, "output": text, "answer": answer, "score": score})
  summary = {"task": task.name, "shots": shots, "n": len(examples), **summarise(task, examples, scores)}
  return summary, samples


def perplexity(scorer, task: Task, limit: int = 0) -> tuple[dict, list]:
  """Bits per byte (and byte perplexity, nats per token) of a source's documents, scored whole."""
  from lm import config as config_lib  # noqa: PLC0415
  from lm.data import corpus_builder, sources  # noqa: PLC0415

  cfg = config_lib.from_json(config_lib.to_json(scorer.cfg))
  every = task.source.startswith("all:")
  cfg.data.source, cfg.data.max_bytes = task.source.removeprefix("all:"), 0
  docs = list(sources.documents(cfg) if every else corpus_builder.split_documents(cfg)[1])
  cap = limit or task.max_documents
  docs = docs[:cap] if cap else docs
  ids = scorer.tok.encode(docs)
  logps = np.asarray(scorer.loglikelihood_rolling(ids))
  n_bytes = np.asarray([len(d.encode()) for d in docs], np.float64)
  n_tokens = np.asarray([len(x) for x in ids], np.float64)
  bpb = -logps.sum() / n_bytes.sum() / math.log(2)
  rng = np.random.default_rng(0)
  resampled = [rng.integers(0, len(docs), len(docs)) for _ in range(200)]
  boot = [-logps[r].sum() / n_bytes[r].sum() / math.log(2) for r in resampled]
  summary = {
    "task": task.name,
    "shots": 0,
    "n": len(docs),
    "bits_per_byte": float(bpb),
    "bits_per_byte_stderr": float(np.std(boot, ddof=1)) if len(docs) > 1 else 0.0,
    "byte_perplexity": float(2**bpb),
    "loss": float(-logps.sum() / n_tokens.sum()),
    "tokens": int(n_tokens.sum()),
  }
  return summary, [
    {"bytes": int(b), "tokens": int(t), "logprob": float(lp)} for b, t, lp in zip(n_bytes, n_tokens, logps, strict=True)
  ]
