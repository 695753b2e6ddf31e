"""What every evaluation asks of a model: log-likelihoods of continuations, of whole documents, and greedy text.

A `Scorer` holds a run's params, sharded as the run was (`lm.workdir.load_params`), and answers in batches
of `batch_size` rows of the run's context length (`data.seq_len`), so each question compiles once:
- `loglikelihood([(context_ids, continuation_ids)])` -> [(sum of log p(continuation | context), whether each
  continuation token is the model's argmax)]. A pair longer than the context loses the start of its context.
- `loglikelihood_rolling([doc_ids])` -> the sum of log p of every token of each document after a bos, in
  windows of the context length L: the first predicts tokens [0, L) after the bos, each next one the next L
  tokens given the one before them, and a last, shorter one its n tokens given the L + 1 - n before them (the
  lm-evaluation-harness's rolling windows with one token of context).
- `generate(prompts, max_new_tokens, stop)` -> greedy text up to the first stop string (the KV-cache sampler).
Rows go to the devices along the mesh's batch axes, as training batches do; the logits are made a chunk of
positions at a time, so a large vocabulary never holds [B, T, V] at once.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lm import model as model_lib
from lm import partitioning
from lm import sampling as sampling_lib
from lm import workdir as workdir_lib
from lm.errors import UserError

CHUNKS = 4


@functools.partial(jax.jit, static_argnames=("model",))
def _score_rows(model, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(sum of log p(target) where loss_mask, whether every such target is the argmax) per row -> [B], [B]."""
  x_BxTxD, head_DxV = model.apply(
    {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], return_hidden=True
  )
  t = x_BxTxD.shape[1]
  n = max(c for c in range(1, min(t, CHUNKS) + 1) if t % c == 0)
  logp_B, greedy_B = 0.0, True
  for lo, hi in ((i * t // n, (i + 1) * t // n) for i in range(n)):
    logits_BxCxV = jnp.einsum(
      "bcd,dv->bcv",
      x_BxTxD[:, lo:hi].astype(model.cfg.dtype),
      head_DxV.astype(model.cfg.dtype),
      preferred_element_type=jnp.float32,
    )
    targets_BxC, mask_BxC = batch["targets"][:, lo:hi], batch["loss_mask"][:, lo:hi]
    ce_BxC, _ = model_lib.cross_entropy(logits_BxCxV, targets_BxC)
    logp_B = logp_B - jnp.sum(ce_BxC * mask_BxC, axis=1)
    hit_BxC = jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC
    greedy_B = greedy_B & jnp.all(hit_BxC | (mask_BxC == 0), axis=1)
  replicated = jax.sharding.PartitionSpec()  # every process reads the scores
  return jax.lax.with_sharding_constraint(logp_B, replicated), jax.lax.with_sharding_constraint(greedy_B, replicated)


@dataclasses.dataclass
class Scorer:
  cfg: object
  tok: object
  setup: object
  params: dict
  batch_size: int = 16
  step: int | None = None  # the checkpoint's, when read from a run

  @classmethod
  def from_run(cls, workdir: str, step: int | None = None, batch_size: int = 16) -> "Scorer":
    cfg, tok, setup, restored = workdir_lib.load_checkpoint(workdir, step)
    if setup.model_cfg.head != "lm":
      raise UserError(f"{workdir} is a reward model: it has no next-token head to evaluate")
    return cls(cfg, tok, setup, restored.state.params, cls.rows_for(setup, batch_size), restored.step)

  @staticmethod
  def rows_for(setup, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the devices the batch axes span, so rows split evenly."""
    data_ways = partitioning.data_parallel_size(setup.mesh)
    return -(-batch_size // data_ways) * data_ways

  @property
  def context(self) -> int:
    return self.cfg.data.seq_len

  def _rows(self, rows: list[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray]:
    """Scores rows (tokens, number of scored tokens at their end), each at most context + 1 tokens long."""
    t, b = self.context, self.batch_size
    logps, greedy = np.zeros(len(rows)), np.zeros(len(rows), bool)
    sharding = partitioning.batch_sharding(self.setup.mesh)
    for lo in tqdm(range(0, len(rows), b), desc="scoring", unit="batch", leave=False, disable=None):
      chunk = rows[lo : lo + b]
      batch = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
      batch["loss_mask"] = np.zeros((b, t), np.float32)
      for i, (tokens, scored) in enumerate(chunk):
        n = len(tokens) - 1
        assert 0 < scored <= n <= t, (scored, n, t)
        batch["inputs"][i, :n], batch["targets"][i, :n] = tokens[:-1], tokens[1:]
        batch["segment_ids"][i, :n], batch["positions"][i, :n] = 1, np.arange(n)
        batch["loss_mask"][i, n - scored : n] = 1.0
      with self.setup.context():
        # Every process holds the whole batch and gives its devices their rows (several processes work too).
        placed = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i]) for k, v in batch.items()}
        out_logp, out_greedy = _score_rows(self.setup.model, self.params, placed)
      logps[lo : lo + len(chunk)] = np.asarray(out_logp)[: len(chunk)]
      greedy[lo : lo + len(chunk)] = np.asarray(out_greedy)[: len(chunk)]
    return logps, greedy

  def loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    rows = []
    for context, continuation in requests:
      if not continuation:
        raise UserError("a continuation to score is empty")
      if not context:
        context = [self.tok.bos_id]
      tokens = (context + continuation)[-(self.context + 1) :]  # keep the continuation, cut the context's start
      rows.append((tokens, min(len(continuation), len(tokens) - 1)))
    logps, greedy = self._rows(rows)
    return [(float(lp), bool(g)) for lp, g in zip(logps, greedy, strict=True)]

  def loglikelihood_rolling(self, docs: list[list[int]]) -> list[float]:
    rows, owner, length = [], [], self.context
    for d, doc in enumerate(docs):
      for start in range(0, len(doc), length):
        end = min(start + length, len(doc))
        tokens = [self.tok.bos_id] + doc[:end] if start == 0 else doc[end - length - 1 : end]
        rows.append((tokens, end - start))
        owner.append(d)
    logps, _ = self._rows(rows)
    totals = np.zeros(len(docs))
    np.add.at(totals, np.asarray(owner, int), logps)
    return totals.tolist()

  @functools.cached_property
  def sampler(self) -> sampling_lib.Sampler:
    """One sampler for every `generate` call: its programs are compiled once per prompt and reply bucket."""
    return sampling_lib.Sampler.for_model(self.setup.model, self.context, self.tok)

  def generate(
    self, prompts: list[list[int]], max_new_tokens: int, stop: tuple[str, ...] = (), stop_ids: tuple[int, ...] = ()
  ) -> list[str]:
    """Greedy continuations of `prompts` (ids, bos included), cut before the first stop string or stop id."""
    sampler = self.sampler
    kept, requests = [], []
    for ids in prompts:
      ids = ids[-(self.context - 1) :]
      kept.append(ids)
      room = min(max_new_tokens, self.context - len(ids))
      requests.append(
        sampling_lib.SamplingParams(
          max_new_tokens=room, temperature=0.0, stop_strings=tuple(stop), stop_tokens=tuple(stop_ids)
        )
      )
    with self.setup.context():
      generations = sampler.generate_all(self.params, kept, requests, self.batch_size)
    return [g.text for g in generations]
