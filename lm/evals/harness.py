"""An lm run as a model of EleutherAI's lm-evaluation-harness (`lm_eval`, 0.4.x), so its tasks score lm checkpoints.

`LMEvalModel` answers the harness's three request types with a `Scorer` (`lm.evals.scoring`), tokenizing with
the run's tokenizer:
- `loglikelihood`: (context, continuation) -> (log p, is greedy). Trailing whitespace of the context moves to
  the start of the continuation (the harness's convention, `TemplateLM._encode_pair`); the context is
  [bos] + encode(context), just [bos] when empty, and the continuation encode(continuation), each encoded alone.
- `loglikelihood_rolling`: (text,) -> the sum of log p of encode(text) after a bos, in context-length windows.
- `generate_until`: (context, gen_kwargs) -> greedy text from [bos] + encode(context), cut before the first of
  gen_kwargs["until"], at most gen_kwargs["max_gen_toks"] tokens (256 when unset, as the harness's models).
  Sampling (`do_sample` or a temperature above 0) is refused: the Scorer decodes greedily.

`run_harness(workdir, tasks, ...)` evaluates a run on harness tasks by name (built-in, or YAML files under
`include_path`) and returns {task: {metric: value, metric_stderr: value, "n": examples}}. Whether a task's data
is downloaded is the harness's business: with HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 only local or cached
data is read.
"""

import contextlib
import difflib
import functools
import logging
import math
import os

import datasets
from lm_eval import evaluator
from lm_eval.api import model as lm_eval_model
from lm_eval.defaults import DEFAULT_OTHER_SEED
from lm_eval.models import utils as lm_eval_model_utils
from lm_eval.tasks import TaskManager
from tqdm import tqdm

from lm.errors import UserError
from lm.evals.scoring import Scorer

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for a task that sets no max_gen_toks
SKIPPED_KEYS = ("alias", "name", "sample_len")  # labels, and the example count that "n" reports


class LMEvalModel(lm_eval_model.LM):
  """The harness's `LM` interface over a `Scorer`: a run's params, tokenizer and context length."""

  def __init__(self, scorer: Scorer):
    super().__init__()
    self.scorer = scorer

  @classmethod
  def from_run(cls, workdir: str, step: int | None = None, batch_size: int = 16) -> "LMEvalModel":
    """The newest checkpoint of the run in `workdir` (or checkpoint `step`), scored `batch_size` rows at a time."""
    return cls(Scorer.from_run(workdir, step, batch_size))

  def _prompt(self, text: str) -> list[int]:
    return [self.scorer.tok.bos_id] + (self.scorer.tok.encode([text])[0] if text else [])

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """[(log p(continuation | context), whether every continuation token is the argmax)] for requests whose
    `args` are (context, continuation)."""
    pairs = []
    for context, continuation in (req.args[:2] for req in requests):
      spaces = len(context) - len(context.rstrip())
      if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
      pairs.append((self._prompt(context), self.scorer.tok.encode([continuation])[0]))
    return self.scorer.loglikelihood(pairs, "lm loglikelihood", progress=False if disable_tqdm else None)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """[log p(text)] for requests whose `args` are (text,), each text scored after a bos."""
    docs = self.scorer.tok.encode([req.args[0] for req in requests])
    return self.scorer.loglikelihood_rolling(docs, "lm loglikelihood_rolling", progress=False if disable_tqdm else None)

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """[greedy continuation] for requests whose `args` are (context, gen_kwargs); requests that share `until` and
    `max_gen_toks` go to the Scorer together."""
    groups = {}
    for i, req in enumerate(requests):
      kwargs = lm_eval_model_utils.normalize_gen_kwargs(req.args[1], DEFAULT_MAX_GEN_TOKS)
      if kwargs["do_sample"]:
        raise UserError(f"lm's harness model generates greedily; a task asks to sample with {req.args[1]}")
      until = tuple(s for s in kwargs["until"] if s)  # the harness skips empty stop strings
      groups.setdefault((until, kwargs["max_gen_toks"]), []).append(i)
    out = [""] * len(requests)
    with tqdm(total=len(requests), desc="lm generate_until", disable=True if disable_tqdm else None) as bar:
      for (until, max_gen_toks), indices in groups.items():
        prompts = [self._prompt(requests[i].args[0]) for i in indices]
        for i, text in zip(indices, self.scorer.generate(prompts, max_gen_toks, stop=until), strict=True):
          out[i] = text
        bar.update(len(indices))
    return out


@functools.cache
def _task_manager(include_path: str | None) -> TaskManager:
  """The harness's index of tasks, built-in and under `include_path`; built once per path (it reads ~15k YAMLs)."""
  return TaskManager(include_path=include_path)


@contextlib.contextmanager
def _quiet():
  """The harness and `datasets` at WARNING and without `datasets`' progress bars; restored afterwards."""
  harness_logger = logging.getLogger("lm_eval")
  level, bars = harness_logger.level, datasets.utils.logging.is_progress_bar_enabled()
  harness_logger.setLevel(logging.WARNING)
  datasets.utils.logging.disable_progress_bar()
  try:
    yield
  finally:
    harness_logger.setLevel(level)
    if bars:
      datasets.utils.logging.enable_progress_bar()


def _plain(value):
  """A metric value as JSON holds it: a float, or None where the harness has no number ("N/A", nan)."""
  if isinstance(value, str) or value is None or not math.isfinite(float(value)):
    return None
  return float(value)


def _metrics(results: dict) -> dict:
  """{task: {metric: value, ..., "n": examples}} from the harness's results, without the ",none" filter suffix."""
  counts = {name: n["effective"] for name, n in results.get("n-samples", {}).items()}
  out = {}
  for name, row in results["results"].items():
    metrics = {key.removesuffix(",none"): _plain(v) for key, v in row.items() if key not in SKIPPED_KEYS}
    subtasks = results.get("group_subtasks", {}).get(name) or [name]
    metrics["n"] = sum(counts.get(t, 0) for t in subtasks)
    out[name] = metrics
  return out


def run_harness(
  workdir: str,
  tasks: list[str],
  include_path: str | None = None,
  num_fewshot: int | None = None,
  limit: int | None = None,
  batch_size: int = 16,
  step: int | None = None,
) -> dict:
  """Scores the run in `workdir` (newest checkpoint, or `step`) on harness `tasks`; returns
  {task: {metric: value, metric_stderr: value, "n": examples scored}} as plain floats and ints.

  `tasks` are names of the harness's tasks, groups or tags, or of YAML tasks under `include_path`; `num_fewshot`
  overrides each task's few-shot count (except a task that fixes it at 0, as the harness does) and `limit` scores
  only the first `limit` examples of each task.
  """
  manager = _task_manager(os.path.abspath(include_path) if include_path else None)
  unknown = [t for t in tasks if t not in manager.task_index and not os.path.isfile(t)]
  if unknown:
    hints = [difflib.get_close_matches(t, manager.all_tasks, n=1) for t in unknown]
    named = ", ".join(f"{t} (did you mean {h[0]}?)" if h else t for t, h in zip(unknown, hints, strict=True))
    raise UserError(f"unknown lm-evaluation-harness task{'s' if len(unknown) > 1 else ''}: {named}")
  with _quiet():
    try:
      loaded = manager.load(list(tasks))
    except ConnectionError as e:  # offline, and a task's data is neither local nor cached
      raise UserError(f"a harness task's data cannot be read: {e}") from e
    for task in loaded["tasks"].values():
      if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
      elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
      task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)  # simple_evaluate's default fewshot_random_seed
    # evaluate, not simple_evaluate: that also imports torch to describe the machine (~3 s), and seeds globals
    model = LMEvalModel.from_run(workdir, step, batch_size)
    results = evaluator.evaluate(lm=model, task_dict=loaded, limit=limit, log_samples=False)
  return _metrics(results)
