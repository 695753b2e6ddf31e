"""What every evaluation asks of a model: log-likelihoods of continuations, of whole documents, and greedy text.

A `Scorer` holds a run's params, sharded as the run was (`lm.workdir.load_params`), and answers in batches
of `batch_size` rows of the run's context length (`data.seq_len`), so each question compiles once; requests
shorter than a row are packed into it, several to a row, each in its own segment:
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

import bisect
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
def _score_tokens(model, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(log p(target), whether the target is the argmax) at every position -> [B, T], [B, T]."""
  x_BxTxD, head_DxV = model.apply(
    {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], return_hidden=True
  )
  t = x_BxTxD.shape[1]
  n = max(c for c in range(1, min(t, CHUNKS) + 1) if t % c == 0)
  logps, hits = [], []
  for lo, hi in ((i * t // n, (i + 1) * t // n) for i in range(n)):
    logits_BxCxV = jnp.einsum(
      "bcd,dv->bcv",
      x_BxTxD[:, lo:hi].astype(model.cfg.dtype),
      head_DxV.astype(model.cfg.dtype),
      preferred_element_type=jnp.float32,
    )
    targets_BxC = batch["targets"][:, lo:hi]
    ce_BxC, _ = model_lib.cross_entropy(logits_BxCxV, targets_BxC)
    logps.append(-ce_BxC)
    hits.append(jnp.argmax(logits_BxCxV, axis=-1) == targets_BxC)
  replicated = jax.sharding.PartitionSpec()  # every process reads the scores
  return (
    jax.lax.with_sharding_constraint(jnp.concatenate(logps, axis=1), replicated),
    jax.lax.with_sharding_constraint(jnp.concatenate(hits, axis=1), replicated),
  )


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
  """Groups of indices into `lengths` whose lengths sum to at most `capacity` each: longest first, each into the
  open group it fills best (the one with the least room that still fits it), a new group when none has room."""
  groups, rooms = [], []  # rooms: (room left, group) of the groups with room, sorted
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    k = bisect.bisect_left(rooms, (lengths[i], -1))  # -1 sorts before every group: the first with enough room
    if k < len(rooms):
      room, group = rooms.pop(k)
    else:
      room, group = capacity, len(groups)
      groups.append([])
    groups[group].append(i)
    if room > lengths[i]:
      bisect.insort(rooms, (room - lengths[i], group))
  return groups


@dataclasses.dataclass
class Scorer:
  cfg: object
  tok: object
  setup: object
  params: dict
  batch_size: int = 16
  step: int | None = None  # the checkpoint's, when read from a run
  packed: bool = True  # short requests share rows (False: one a row, for `lm bench score`)

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

  def _rows(self, sequences: list[tuple[list[int], int]], desc: str = "scoring", progress: bool | None = None):
    """Scores sequences (tokens, number of scored tokens at their end), each at most context + 1 tokens long:
    [sum of their scored tokens' log p], [whether each of those tokens is the argmax].

    Short sequences share a row of the batch, each in its own segment with positions from 0, as training packs
    documents: the model's segment mask keeps them apart, so each scores as it would alone. Not in a model
    whose experts drop the tokens beyond their capacity: a row's tokens compete for it (dropless MoE shares)."""
    t, b = self.context, self.batch_size
    for tokens, scored in sequences:
      assert 0 < scored <= len(tokens) - 1 <= t, (scored, len(tokens), t)
    moe = self.setup.model_cfg.moe
    if self.packed and not (moe.experts and moe.capacity_factor > 0):
      rows = best_fit([len(tokens) - 1 for tokens, _ in sequences], t)
    else:
      rows = [[i] for i in range(len(sequences))]
    logps, greedy = np.zeros(len(sequences)), np.zeros(len(sequences), bool)
    sharding = partitioning.batch_sharding(self.setup.mesh)
    disable = None if progress is None else not progress
    with tqdm(total=len(sequences), desc=desc, unit="request", leave=False, disable=disable) as bar:
      for lo in range(0, len(rows), b):
        batch = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        spans = []  # (sequence, batch row, its first scored position, its end)
        for i, members in enumerate(rows[lo : lo + b]):
          start = 0
          for segment, j in enumerate(members, 1):
            tokens, scored = sequences[j]
            n = len(tokens) - 1
            batch["inputs"][i, start : start + n], batch["targets"][i, start : start + n] = tokens[:-1], tokens[1:]
            batch["segment_ids"][i, start : start + n], batch["positions"][i, start : start + n] = segment, np.arange(n)
            spans.append((j, i, start + n - scored, start + n))
            start += n
        with self.setup.context():
          # Every process holds the whole batch and gives its devices their rows (several processes work too).
          placed = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i]) for k, v in batch.items()}
          logp_BxT, hit_BxT = (np.asarray(x) for x in _score_tokens(self.setup.model, self.params, placed))
        for j, i, first, end in spans:
          logps[j], greedy[j] = logp_BxT[i, first:end].sum(dtype=np.float64), hit_BxT[i, first:end].all()
        bar.update(sum(map(len, rows[lo : lo + b])))
    return logps, greedy

  def loglikelihood(
    self, requests: list[tuple[list[int], list[int]]], desc: str = "scoring", progress: bool | None = None
  ) -> list[tuple[float, bool]]:
    """(`progress`: a progress bar over the requests, named `desc`; None: when stderr is a terminal.)"""
    sequences = []
    for context, continuation in requests:
      if not continuation:
        raise UserError("a continuation to score is empty")
      if not context:
        context = [self.tok.bos_id]
      tokens = (context + continuation)[-(self.context + 1) :]  # keep the continuation, cut the context's start
      sequences.append((tokens, min(len(continuation), len(tokens) - 1)))
    logps, greedy = self._rows(sequences, desc, progress)
    return [(float(lp), bool(g)) for lp, g in zip(logps, greedy, strict=True)]

  def loglikelihood_rolling(self, docs: list[list[int]], desc: str = "scoring", progress: bool | None = None):
    sequences, owner, length = [], [], self.context
    for d, doc in enumerate(docs):
      for start in range(0, len(doc), length):
        end = min(start + length, len(doc))
        tokens = [self.tok.bos_id] + doc[:end] if start == 0 else doc[end - length - 1 : end]
        sequences.append((tokens, end - start))
        owner.append(d)
    logps, _ = self._rows(sequences, desc, progress)
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
