"""What the post-training objectives share: their data (`data.post_source`) and the preference objectives' base.

`PostData` is a run's conversations (SFT, objective `lm`) or preference pairs (objectives `reward` and
`dpo`), read by `lm.data.post`: parsed and checked in `prepare` (a bad record is a one-line error naming
its file and line, before the workdir is touched), tokenized with the run's tokenizer in `train_batches`,
held out by `data.eval_fraction` or `data.post_eval_source`, and counted: the examples, truncated and dropped
of both splits, said on stderr and logged once (`data/...`, `data/eval_...`) with the first evaluation.

`Pairs` is the base of the preference objectives: their batches (P pairs as 2P rows, so `train.batch_size`
counts rows, and the loop's tokens count both rows of a pair) and their evaluation, which is their own loss
and metrics on the held-out pairs, logged as `eval/loss` and `eval/NAME`.
"""

import sys

import jax

from lm import distributed, partitioning
from lm.data import pipeline, post
from lm.errors import UserError
from lm.objectives import Batches, Objective


class PostData:
  """The post-training data of a run: `kind` "sft" (conversations) or "preference" (pairs)."""

  def __init__(self, cfg, kind: str):
    self.cfg, self.kind = cfg, kind
    self.parsed: post.Parsed | None = None
    self.train: post.Dataset | None = None
    self.eval: post.Dataset | None = None

  def prepare(self) -> None:
    """Reads and checks every record (UserError naming a bad one) and splits them; needs no tokenizer."""
    d = self.cfg.data
    self.parsed = post.parse(self.cfg, d.post_source, self.kind, d.eval_fraction, d.post_eval_source)

  def load(self, tokenizer) -> None:
    """Tokenizes both splits (`data.overlong`, `train.loss_on`) and says their sizes once on stderr."""
    if self.parsed is None:
      self.prepare()
    c = self.cfg
    self.train, self.eval = post.tokenize_parsed(
      tokenizer, self.parsed, c.data.seq_len, c.train.loss_on, c.data.overlong
    )
    if self.eval is None or not self.eval.examples:
      raise UserError(f"no held-out post-training examples to evaluate ({self.describe()})")
    if distributed.is_lead():
      held = f"eval {c.data.post_eval_source}" if c.data.post_eval_source else f"held out {c.data.eval_fraction:g}"
      print(f"lm: post-training data {c.data.post_source} ({held}): {self.describe()}", file=sys.stderr)

  def describe(self) -> str:
    nouns = "conversations" if self.kind == "sft" else "pairs"
    parts = []
    for name, data in (("train", self.train), ("eval", self.eval)):
      if data is not None:
        parts.append(f"{name} {len(data.examples):,} {nouns} ({data.truncated:,} truncated, {data.dropped:,} dropped)")
    return ", ".join(parts)

  def iterator(self, process_index: int, process_count: int) -> pipeline.RowsIterator:
    """A new iterator of this process's train batches, from the first."""
    t = self.cfg.train
    return post.make_iterator(self.train, t.batch_size, t.seed, process_index, process_count)

  def eval_set(self, process_index: int, process_count: int) -> pipeline.EvalSet:
    """The held-out examples, up to `train.eval_batches` batches: this process's rows."""
    t = self.cfg.train
    return post.make_eval_set(self.eval, t.batch_size, process_index, process_count, t.eval_batches)

  def counts(self) -> dict[str, float]:
    """{data/examples, data/truncated, data/dropped} of the train split and the same as data/eval_... of eval."""
    counts = self.train.metrics("data/")
    if self.eval is not None:
      counts.update(self.eval.metrics("data/eval_"))
    return {k: float(v) for k, v in counts.items()}


class Pairs(Objective):
  """The base of the objectives that learn from preference pairs (`data.post_source`): batches and evaluation.

  Subclasses give `make_loss`, whose `loss_sum` and `metric_sums` are weighted means over the batch's pairs
  times the normaliser, the count of real pairs (`lm.preference.pair_weights`): so padding pairs weigh nothing.
  """

  rows_per_example = 2
  row_scalars = ("margin",)

  def __init__(self, cfg):
    super().__init__(cfg)
    self.data = PostData(cfg, "preference")

  def prepare(self) -> None:
    cfg, name = self.cfg, self.cfg.train.objective
    if not cfg.data.post_source:
      raise UserError(f"train.objective={name} needs data.post_source: preference pairs (jsonl:GLOB or tfds:NAME)")
    rows = cfg.train.batch_size // cfg.optim.grad_accum_steps
    if rows % 2:
      raise UserError(
        f"train.objective={name} trains on pairs of rows: train.batch_size / optim.grad_accum_steps ({rows}) "
        "must be even"
      )
    self.data.prepare()

  def train_batches(self, tokenizer, process_index: int, process_count: int) -> Batches:
    self.data.load(tokenizer)
    return self.data.iterator(process_index, process_count)

  def evaluator(self, setup, tokenizer, batches: Batches, start: int):
    sharding = partitioning.batch_sharding(setup.mesh)
    local = self.data.eval_set(jax.process_index(), jax.process_count())
    eval_batches = [pipeline.global_batch(b, sharding) for b in local.batches]
    loss_fn = self.make_loss(setup.model)
    key = jax.random.key(0)  # the losses use no randomness; the key is the signature's
    step = jax.jit(
      lambda params, batch: loss_fn(params, batch, key, {}),
      in_shardings=(setup.state_shardings.params, sharding),
      out_shardings=partitioning.replicated(setup.mesh),
    )
    once = self.data.counts() if start < self.cfg.train.eval_every else {}  # with the first evaluation

    def evaluate(params) -> dict:
      nonlocal once
      loss_sum, pairs, sums = 0.0, 0.0, {}
      for batch in eval_batches:
        batch_loss, batch_pairs, batch_sums = jax.device_get(step(params, batch))
        loss_sum, pairs = loss_sum + float(batch_loss), pairs + float(batch_pairs)
        for name, value in batch_sums.items():
          sums[name] = sums.get(name, 0.0) + float(value)
      row = {"eval/loss": loss_sum / pairs, **{f"eval/{k}": v / pairs for k, v in sums.items()}, "eval/pairs": pairs}
      row.update(once)
      once = {}
      return row

    return evaluate
