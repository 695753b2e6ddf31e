"""Next-token prediction (`train.objective = "lm"`): pre-training, and supervised fine-tuning (SFT).

The loss is the cross-entropy of every target whose `loss_mask` is 1 (plus `model.z_loss`), summed,
over the count of those targets. Its evaluation scores the validation split and each eval source
(loss, perplexity, bits per byte), the next train batches before training on them, the unigram
baseline once, and completes `train.sample_prompts`.

An MoE model (`model.moe.experts` > 0) adds its routers' load-balancing and z-losses, weighted by
`model.moe.aux_loss` and `model.moe.z_loss`, and logs `train/moe/...`: each expert's load, the dropped
fraction, the router entropy and both auxiliary losses (means over MoE layers). `train/loss` stays the
cross-entropy, comparable with a dense model's.

With `data.post_source` set, the run is SFT: it trains on those conversations instead of `data.source`,
packed whole into rows (`lm.data.post`), the loss on the assistant tokens `train.loss_on` chooses (the
chat template's mask). `eval/...` is then the held-out conversations' (`data.eval_fraction` of them by a
hash, or `data.post_eval_source`), over the same masked tokens; `data.eval_sources` are still scored (the
forgetting of pre-training text), and so are the next train batches. The unigram baseline is left out: a
frequency baseline of assistant tokens says little. The data's counts (`data/examples`, `data/truncated`,
`data/dropped`, and `data/eval_...`) are logged once, with the first evaluation.
"""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lm import config as config_lib
from lm import distributed, partitioning, sampling
from lm.data import pipeline
from lm.model import MOE_STATS, cross_entropy, head_loss, moe_stats
from lm.objectives import Batches, Objective
from lm.objectives.posttrain import PostData


class NextToken(Objective):
  """Next-token prediction on the packed batches of `lm.data.pipeline`, or of `lm.data.post` (SFT)."""

  def __init__(self, cfg):
    super().__init__(cfg)
    self.post = PostData(cfg, "sft") if cfg.data.post_source else None

  def prepare(self) -> None:
    pipeline.prepare_all(self.cfg, train_source=self.post is None)
    if self.post is not None:
      self.post.prepare()

  def make_loss(self, model):
    z_loss, moe = self.cfg.model.z_loss, self.cfg.model.moe

    def loss(params, batch, rng, frozen):
      del frozen
      (x_BxTxD, head_DxV), sown = model.apply(
        {"params": params},
        batch["inputs"],
        batch["segment_ids"],
        batch["positions"],
        return_hidden=True,
        rngs={"dropout": rng},
        mutable=["moe"],
      )
      objective, ce = head_loss(x_BxTxD, head_DxV, batch["targets"], batch["loss_mask"], z_loss, model.cfg.dtype)
      tokens = jnp.sum(batch["loss_mask"])
      if not model.cfg.moe.experts:
        return objective, tokens, {"loss": ce}
      # The routers' auxiliary losses are means over tokens; weighted by the tokens, they divide out like the loss.
      stats = moe_stats(sown["moe"])
      objective = objective + tokens * (moe.aux_loss * stats["aux_loss"] + moe.z_loss * stats["z_loss"])
      metrics = {f"moe/{name}": tokens * stats[name] for name in MOE_STATS if name != "load"}
      metrics.update({f"moe/load_{i}": tokens * load for i, load in enumerate(stats["load"])})
      return objective, tokens, {"loss": ce, **metrics}

    return loss

  def train_batches(self, tokenizer, process_index: int, process_count: int) -> Batches:
    if self.post is None:
      return pipeline.make_train_iterator(self.cfg, tokenizer, process_index, process_count)
    self.post.load(tokenizer)
    return self.post.iterator(process_index, process_count)

  def evaluator(self, setup, tokenizer, batches: Batches, start: int):
    cfg = self.cfg
    proc, nproc = jax.process_index(), jax.process_count()
    sharding = partitioning.batch_sharding(setup.mesh)
    eval_step = make_eval_step(setup, tokenizer.token_bytes)
    local_sets = pipeline.make_eval_sets(cfg, tokenizer, proc, nproc, validation=self.post is None)
    if self.post is not None:
      local_sets = {"": self.post.eval_set(proc, nproc), **local_sets}
    eval_sets = {n: [pipeline.global_batch(b, sharding) for b in s.batches] for n, s in local_sets.items()}
    sizes = describe_eval_sets(cfg, local_sets)
    lookahead = None
    if cfg.train.eval_next_train_batches:
      lookahead = self.train_batches_again(tokenizer, proc, nproc)
    once = {}  # logged with the first eval, if it is still to come
    if start < cfg.train.eval_every and self.post is None:
      sample = pipeline.make_train_iterator(cfg, tokenizer, proc, nproc)
      baseline = unigram_loss((next(sample) for _ in range(32)), local_sets[""].batches, tokenizer.vocab_size)
      once["eval/unigram_loss"] = baseline
    if start < cfg.train.eval_every and self.post is not None:
      once.update(self.post.counts())
    samples = sampling.EvalSamples(cfg, setup.model, tokenizer) if cfg.train.sample_prompts else None

    def evaluate(params) -> dict:
      nonlocal once
      row = {}
      for name, eval_batches in eval_sets.items():
        row.update(evaluate_batches(eval_step, params, eval_batches, eval_prefix(name)))
      row.update(sizes)
      if lookahead is not None:
        upcoming = next_train_batches(lookahead, batches, len(eval_sets[""]), sharding)
        row["eval/next_train_batches_loss"] = evaluate_batches(eval_step, params, upcoming)["eval/loss"]
      row.update(once)
      once = {}
      if samples is not None:
        row.update(samples(params))
      return row

    return evaluate

  def train_batches_again(self, tokenizer, process_index: int, process_count: int) -> Batches:
    """A second iterator of the train batches, for looking ahead; post data is not tokenized again."""
    if self.post is None:
      return pipeline.make_train_iterator(self.cfg, tokenizer, process_index, process_count)
    return self.post.iterator(process_index, process_count)


def make_eval_step(setup, token_bytes: np.ndarray):
  """A jitted `(params, batch) -> {loss_sum, tokens, bytes}`; sums, so batches add up exactly."""
  token_bytes_V = jnp.asarray(token_bytes, jnp.float32)

  def step(params, batch):
    logits_BxTxV = setup.model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
    loss_BxT, _ = cross_entropy(logits_BxTxV, batch["targets"])
    mask_BxT = batch["loss_mask"]
    return {
      "loss_sum": jnp.sum(loss_BxT * mask_BxT),
      "tokens": jnp.sum(mask_BxT),
      "bytes": jnp.sum(token_bytes_V[batch["targets"]] * mask_BxT),
    }

  return jax.jit(
    step,
    in_shardings=(setup.state_shardings.params, partitioning.batch_sharding(setup.mesh)),
    out_shardings=partitioning.replicated(setup.mesh),
  )


def unigram_loss(train_batches, eval_batches: list[dict], vocab_size: int) -> float:
  """Nats/token on the eval targets of the add-one-smoothed unigram distribution of train targets.

  The baseline a model must beat to have learned anything beyond token frequencies.
  """
  counts_V = np.ones(vocab_size)
  for batch in train_batches:
    np.add.at(counts_V, batch["targets"][batch["loss_mask"] > 0], 1)
  log_p_V = np.log(counts_V / counts_V.sum())
  total, n = 0.0, 0.0
  for batch in eval_batches:
    mask = batch["loss_mask"] > 0
    total -= log_p_V[batch["targets"][mask]].sum()
    n += mask.sum()
  return total / max(n, 1.0)


def evaluate_batches(eval_step, params, batches: list[dict], prefix: str = "eval/") -> dict[str, float]:
  """Loss (nats/token), perplexity and bits per byte over fixed evaluation batches, keys under `prefix`."""
  totals = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
  for batch in batches:
    for k, v in jax.device_get(eval_step(params, batch)).items():
      totals[k] += float(v)
  loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
  return {
    f"{prefix}loss": loss,
    f"{prefix}perplexity": math.exp(min(loss, 50.0)),
    f"{prefix}bpb": totals["loss_sum"] / math.log(2) / max(totals["bytes"], 1.0),
  }


def next_train_batches(copy, data, n: int, sharding) -> list[dict]:
  """The `n` train batches that `data` will give next, read by `copy`, a second iterator of the same data.

  `data` does not move. Their loss, under parameters that have not trained on them yet, is what the
  logged train loss should match if batches are independent of each other.
  """
  copy.set_state(data.get_state())
  return [pipeline.global_batch(next(copy), sharding) for _ in range(n)]


def eval_prefix(name: str) -> str:
  """Where an eval set's metrics go: `eval/` for the validation split, `eval/NAME/` for an eval source."""
  return f"eval/{name}/" if name else "eval/"


def describe_eval_sets(cfg, eval_sets: dict[str, pipeline.EvalSet]) -> dict[str, float]:
  """Each eval set's size as metrics (`eval/tokens`, `eval/documents`, ...), said once on stderr by process 0.

  A set with fewer than `data.eval_min_tokens` target tokens gets a warning: its loss is noisy.
  """
  sizes = {}
  for name, eval_set in eval_sets.items():
    prefix = eval_prefix(name)
    sizes[f"{prefix}tokens"], sizes[f"{prefix}documents"] = float(eval_set.tokens), float(eval_set.documents)
    if not distributed.is_lead():
      continue
    source = config_lib.eval_sources(cfg)[name][0] if name else cfg.data.post_eval_source or cfg.data.post_source
    source = source or cfg.data.source
    print(
      f"lm: eval set {prefix.rstrip('/')} ({source}): {eval_set.tokens:,} tokens of {eval_set.documents:,} documents"
      f" in {len(eval_set.batches)} batches",
      file=sys.stderr,
    )
    if eval_set.tokens < cfg.data.eval_min_tokens:
      print(
        f"lm: warning: eval set {prefix.rstrip('/')} holds {eval_set.tokens:,} tokens, fewer than "
        f"data.eval_min_tokens={cfg.data.eval_min_tokens:,}: its loss is noisy (more data.eval_fraction or "
        "train.eval_batches give more)",
        file=sys.stderr,
      )
  return sizes
