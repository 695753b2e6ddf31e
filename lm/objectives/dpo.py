"""Direct preference optimisation (`train.objective = "dpo"`): a policy trained on preference pairs against a
frozen reference.

The policy starts from `train.init_from` (required: an SFT run, typically) and the reference is that same
starting model. `dpo.rpo_alpha` > 0 adds that weight times the chosen reply's negative log-likelihood per token
(RPO, Pang et al. 2024; TRL's rpo_alpha), logged as nll_loss: it keeps DPO from lowering the likelihood of the
replies it prefers. A row's log-probability is the sum of log p(target) over its response's targets
(`lm.preference.hidden_sequence_logps`, from the final hidden states a chunk of positions at a time, so the
[B, T, V] logits are never held whole); the loss is `lm.preference.dpo_loss` of the policy's and the
reference's, with `dpo.beta`, `dpo.loss` (sigmoid | ipo | hinge) and `dpo.label_smoothing`. While the policy is
the reference, every reward is 0: the sigmoid loss is ln 2 and the accuracy 0.5.

`dpo.reference` says where the reference's log-probs come from:
- "step": the state holds the reference params (`TrainState.frozen["reference"]`, sharded as the params are,
  checkpointed with them), and every step runs its forward pass beside the policy's: a third more FLOPs per
  token (counted in MFU) and a second copy of the params in memory. A LoRA policy (`model.lora_rank` > 0)
  needs no copy: its reference is its own params with the adapters off (every B zero), which is the starting
  model exactly, as its adapters start with B = 0.
- "precomputed": before the first step, one forward pass of the starting params over every train and eval pair
  gives each row's reference log-prob; they are kept with the dataset (`Example.ref_logps`), so each batch
  carries `ref_logps` [B], and the state holds no reference. They are part of the data state (`get_state`,
  JSON, exact), so a checkpoint holds them and a resumed run, under any process count, reads them back instead
  of recomputing them from params it no longer has. Every process computes all of them (global batches of
  the examples in order), so all hold the same values.
The held-out pairs' reference log-probs are computed at the start of every run in both modes (from the
state's reference in "step" mode), so evaluation needs no reference forward pass.

Data and batches are the reward model's (`lm.objectives.reward`): 2P rows for P pairs. Metrics, as train/NAME
and on the held-out pairs eval/NAME: loss, and TRL's rewards/chosen, rewards/rejected (beta times the policy's
minus the reference's log-prob), rewards/accuracy, rewards/margin, logps/chosen, logps/rejected (the policy's).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lm import partitioning
from lm.data import pipeline, post
from lm.errors import UserError
from lm.model import LORA_B
from lm.objectives.posttrain import Pairs
from lm.preference import dpo_loss, hidden_sequence_logps, pair_weights, split_pairs


class DPO(Pairs):
  """DPO and its IPO and hinge variants on preference pairs, against the starting model."""

  @property
  def row_scalars(self) -> tuple[str, ...]:
    return ("margin", "ref_logps") if self.cfg.dpo.reference == "precomputed" else ("margin",)

  def prepare(self) -> None:
    if not self.cfg.train.init_from:
      raise UserError(
        "train.objective=dpo needs train.init_from: the run (an SFT model, say) whose params start the policy and "
        "are its reference"
      )
    super().prepare()

  def frozen(self, params: dict) -> dict:
    return {"reference": params} if self.cfg.dpo.reference == "step" and not self.cfg.model.lora_rank else {}

  def reference(self, params: dict, frozen: dict) -> dict:
    """The reference's params in "step" mode, given the policy's and the frozen trees."""
    return adapters_off(params) if self.cfg.model.lora_rank else frozen["reference"]

  def train_batches(self, tokenizer, process_index: int, process_count: int):
    rows = super().train_batches(tokenizer, process_index, process_count)
    return rows if self.cfg.dpo.reference == "step" else WithReference(rows, self.data)

  def begin(self, setup, state, batches, start: int) -> None:
    if self.cfg.dpo.reference == "step":
      set_ref_logps(self.data.eval, dataset_logps(setup, self.reference(state.params, state.frozen), self.data.eval))
    elif not batches.ready:
      assert start == 0, "a resumed run reads its reference log-probs from its checkpoint's data state"
      batches.set_tables({name: dataset_logps(setup, state.params, data) for name, data in batches.datasets.items()})

  def flops_per_token(self, model_cfg) -> tuple[float, float]:
    model, computed = super().flops_per_token(model_cfg)
    if self.cfg.dpo.reference == "precomputed":
      return model, computed
    return model * 4 / 3, computed * 4 / 3  # the reference's forward pass: a third of a forward and backward

  def make_loss(self, model):
    d = self.cfg.dpo

    def loss(params, batch, rng, frozen):
      del rng
      pi_B = sequence_logps(model, params, batch)
      if "ref_logps" in batch:
        ref_B = batch["ref_logps"]
      else:
        ref_B = sequence_logps(model, jax.lax.stop_gradient(self.reference(params, frozen)), batch)
      weights_P = pair_weights(batch["segment_ids"])
      (pi_chosen_P, pi_rejected_P), (ref_chosen_P, ref_rejected_P) = split_pairs(pi_B), split_pairs(ref_B)
      mean, metrics = dpo_loss(
        pi_chosen_P, pi_rejected_P, ref_chosen_P, ref_rejected_P, d.beta, d.loss, d.label_smoothing, weights_P
      )
      pairs = jnp.sum(weights_P)
      if d.rpo_alpha:  # RPO: the chosen reply's mean negative log-likelihood per token, weighted
        tokens_P, _ = split_pairs(jnp.sum(batch["loss_mask"], axis=1))
        nll_P = -pi_chosen_P / jnp.maximum(tokens_P, 1.0)
        nll = jnp.sum(weights_P * nll_P) / jnp.maximum(pairs, 1.0)
        mean, metrics = mean + d.rpo_alpha * nll, {**metrics, "nll_loss": nll}
      return mean * pairs, pairs, {name: value * pairs for name, value in metrics.items()}

    return loss


def sequence_logps(model, params, batch: dict):
  """Each row's log-probability of its response [B] f32: sum of log p(target) where `loss_mask` is 1."""
  x_BxTxD, head_DxV = model.apply(
    {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], return_hidden=True
  )
  return hidden_sequence_logps(x_BxTxD, head_DxV, batch["targets"], batch["loss_mask"], model.cfg.dtype)


def adapters_off(params: dict) -> dict:
  """`params` with every LoRA adapter's B zero: the function of the base model the adapters started from."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: jnp.zeros_like(v) if k[-1].endswith(LORA_B) else v for k, v in flat.items()})


def dataset_logps(setup, params, data: post.Dataset) -> np.ndarray:
  """The log-probabilities under `params` of every row of a preference Dataset's pairs -> f32 [2N], pair i's
  chosen at 2i and rejected at 2i + 1; the same in every process. Forward passes over `train.batch_size` rows,
  as evaluation's. Run inside `setup.context()`."""
  t = setup.cfg.train
  sharding = partitioning.batch_sharding(setup.mesh)
  logps = jax.jit(
    lambda params, batch: sequence_logps(setup.model, params, batch),
    in_shardings=(setup.state_shardings.params, sharding),
    out_shardings=partitioning.replicated(setup.mesh),
  )
  out, per_batch = [], t.batch_size // 2
  for lo in range(0, len(data.examples), per_batch):  # a batch's rows at a time: the dataset may be large
    chunk = dataclasses.replace(data, examples=data.examples[lo : lo + per_batch])
    (local,) = post.make_eval_set(chunk, t.batch_size, jax.process_index(), jax.process_count()).batches
    out.append(jax.device_get(logps(params, pipeline.global_batch(local, sharding))))
  return np.concatenate(out).astype(np.float32)[: 2 * len(data.examples)]


def set_ref_logps(data: post.Dataset, logps_2N: np.ndarray) -> None:
  """Gives each pair of `data` its rows' reference log-probs (`dataset_logps`' layout), which its rows then carry."""
  if len(logps_2N) != 2 * len(data.examples):
    raise UserError(
      f"the saved reference log-probs are for {len(logps_2N) // 2:,} pairs, but the data holds "
      f"{len(data.examples):,}: the post-training data changed since the run started"
    )
  for i, example in enumerate(data.examples):
    example.ref_logps = (float(logps_2N[2 * i]), float(logps_2N[2 * i + 1]))


class WithReference:
  """The train batches of a "precomputed" DPO run: pairs whose rows carry `ref_logps`, once `set_tables` (or a
  restored state) has given them. Its state is the rows' and the reference log-probs of the train and eval pairs."""

  def __init__(self, rows: pipeline.RowsIterator, data):
    self.rows = rows
    self.datasets = {"train": data.train, "eval": data.eval}
    self.tables: dict[str, list[float]] | None = None

  @property
  def ready(self) -> bool:
    return self.tables is not None

  def set_tables(self, tables: dict) -> None:
    for name, data in self.datasets.items():
      set_ref_logps(data, np.asarray(tables[name], np.float32))
    self.tables = {name: np.asarray(tables[name], np.float32).tolist() for name in self.datasets}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    assert self.ready, "the reference log-probs are computed (DPO.begin) before the first batch"
    return next(self.rows)

  def get_state(self) -> dict:
    return {**self.rows.get_state(), "ref_logps": self.tables}

  def set_state(self, state: dict) -> None:
    if not state.get("ref_logps"):
      raise UserError("the checkpoint holds no reference log-probs (dpo.reference=precomputed)")
    self.rows.set_state(state)
    self.set_tables(state["ref_logps"])
