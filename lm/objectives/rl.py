"""Reinforcement learning from a reward (`train.objective` = "ppo" or "grpo"), on the one loop.

A step of the loop is one minibatch update. Every `rl.ppo_epochs * rl.num_minibatches` steps the objective's
batches (`Rollouts`) make a rollout from the current params before handing out its minibatches:
- prompts: `train.batch_size * rl.num_minibatches / rl.group_size` prompts of `data.post_source` (records
  `lm.data.post.prompt` reads), in an order reshuffled every epoch from `train.seed`, each answered
  `rl.group_size` times;
- responses: sampled with the KV-cache sampler (`lm.sampling`, prompts padded to one length, so the prefill and
  the decode loop compile once per run) at `rl.temperature`, up to `rl.max_new_tokens` tokens, ending at the
  chat template's end-of-turn token, which the response keeps; row i of rollout k samples with seed
  train.seed * 1,000,003 + k * rows + i, so a resumed run samples what the uninterrupted one did
  (`rl.greedy_in_group`: each group's first response is greedy instead);
- score: the reward model's (`rl.reward_model`, a run of `train.objective=reward`, read at the response's last
  token) or a Python function's (`rl.reward_fn` = "module:function", called as f(prompt, response, metadata)
  with the prompt's messages, the response's text and the record's other fields), minus
  `rl.missing_eos_penalty` for a response that never ended its turn;
- one jitted pass of the policy (the rollout's log-probs), the reference (the starting params, frozen in the
  state as DPO's are; a LoRA policy's is itself with the adapters off) and, for PPO, the value head, then the
  advantages:
  PPO: per-token reward -kl_coef * KL estimate (`rl.kl_estimator`), plus the score at the last response token;
       GAE (`rl.gamma`, `rl.lam`) against the value head's values, advantages whitened; `rl.kl_target` > 0
       adapts kl_coef after each rollout (Ziegler et al. 2019's proportional controller, `rl.kl_horizon`);
  GRPO: each response's score minus its group's mean, over the group's std (`rl.scale_rewards`), the same for
       every token; the KL to the reference is a term of the loss instead (k3, weight `rl.kl_coef`).
Each step then trains on one minibatch of the rollout's rows (a new order each epoch):
  PPO:  clipped policy loss (`rl.cliprange`) + rl.vf_coef * clipped value loss (`rl.cliprange_value`);
  GRPO: clipped policy loss + rl.kl_coef * k3(policy, reference);
both aggregated by `rl.loss_aggregation` over the response tokens.

The value function is a linear head on the policy's final hidden states (`value_head`, [D], zero at the start),
with the gradient stopped at those states, not a second model initialised from the reward model as TRL does: one
forward and backward pass serves both losses, the state keeps one params tree (so checkpoints, sharding, LoRA and
`train.init_from` need nothing new), and the memory is one model's. The value loss trains the head alone, never
the policy: at the start the head knows nothing (a value loss near 6 on the instruction world, against a policy
loss near 0.02), and that gradient has no business in the trunk that samples the replies. The price is a value
estimate no better than a linear probe of the policy's features; with `rl.lam` near 1 the advantages lean on the
returns more than on it.

The rollout (its rows, log-probs, advantages, returns and values, and the controller's kl_coef) is part of the
batches' state, so a checkpoint between two rollouts resumes on the same minibatches. The reward model is
loaded from its run at the start (the step recorded in that state, on resume). Rollout metrics are logged as
`rl/...` at each log step; the update's as `train/...`; each eval answers `rl.eval_prompts` held-out prompts
greedily (`eval/reward`, `eval/response_length`, `eval/ended`) and logs three of them as samples.
"""

import dataclasses
import importlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import chat, distributed, partitioning, rl
from lm import sampling as sampling_lib
from lm.data import post
from lm.errors import UserError
from lm.objectives import Objective
from lm.objectives.dpo import adapters_off
from lm.objectives.posttrain import PostData

VALUE_HEAD = "value_head"
BUFFER_KEYS = ("old_logps", "ref_logps", "advantages", "returns", "old_values")  # [B, T] f32, beside the format's


@dataclasses.dataclass
class Prompts:
  """Tokenized prompts: each one's chat-template ids (with the generation prompt), messages and metadata."""

  ids: list[list[int]]
  items: list[post.Prompt]
  dropped: int = 0


def tokenize_prompts(tok, parsed_items: list[post.Prompt], limit: int, overlong: str, where: list[str]) -> Prompts:
  """The prompts that leave room for a response (at most `limit` ids); longer ones dropped, or an error."""
  out = Prompts([], [])
  for item, place in zip(parsed_items, where, strict=True):
    ids = chat.render(tok, item.prompt, generation_prompt=True)[0]
    if len(ids) > limit:
      if overlong == "error":
        raise UserError(f"{place}: the prompt is {len(ids)} tokens, more than data.seq_len - rl.max_new_tokens")
      out.dropped += 1
      continue
    out.ids.append(ids)
    out.items.append(item)
  return out


def load_reward_fn(name: str):
  """The function `module:function` names; a UserError if it cannot be imported."""
  module, _, function = name.partition(":")
  try:
    fn = getattr(importlib.import_module(module), function)
  except (ImportError, AttributeError) as e:
    raise UserError(f"rl.reward_fn {name!r} cannot be loaded: {e}") from None
  if not callable(fn):
    raise UserError(f"rl.reward_fn {name!r} is not callable")
  return fn


class RL(Objective):
  """What PPO and GRPO share: prompts, rollouts, the reference, evaluation. Subclasses give the advantages and loss."""

  token_arrays = BUFFER_KEYS
  uses_values = False

  def __init__(self, cfg):
    super().__init__(cfg)
    self.data = PostData(cfg, "prompt")
    self.reward_fn = None

  def prepare(self) -> None:
    r = self.cfg.rl
    if r.reward_fn:
      self.reward_fn = load_reward_fn(r.reward_fn)
    self.data.prepare()

  def frozen(self, params: dict) -> dict:
    return {} if self.cfg.model.lora_rank else {"reference": model_params(params)}

  def reference(self, params: dict, frozen: dict) -> dict:
    return adapters_off(model_params(params)) if self.cfg.model.lora_rank else frozen["reference"]

  def train_batches(self, tokenizer, process_index: int, process_count: int):
    c = self.cfg
    limit = c.data.seq_len - c.rl.max_new_tokens
    parsed = self.data.parsed
    self.train, self.eval = (
      tokenize_prompts(tokenizer, items, limit, c.data.overlong, [r.where for r in records])
      for records, items in (parsed.train, parsed.eval)
    )
    if not self.train.ids or not self.eval.ids:
      dropped = self.train.dropped + self.eval.dropped
      raise UserError(
        f"rl needs train and held-out prompts that fit data.seq_len - rl.max_new_tokens = {limit} tokens: "
        f"{len(self.train.ids)} train, {len(self.eval.ids)} held out ({dropped} too long)"
      )
    if distributed.is_lead():
      print(
        f"lm: rl prompts {c.data.post_source}: train {len(self.train.ids):,}, eval {len(self.eval.ids):,} "
        f"({self.train.dropped + self.eval.dropped:,} too long, dropped)",
        file=sys.stderr,
      )
    self.tokenizer = tokenizer
    if c.rl.reward_model:
      self.reward_setup = reward_model_setup(c, tokenizer)
    return Rollouts(self, process_index, process_count)

  def begin(self, setup, state, batches, start: int) -> None:
    batches.begin(setup)

  def next_batch(self, batches, state) -> dict:
    return batches.next(state)

  def log_metrics(self, batches) -> dict:
    return dict(batches.metrics)

  # The score of a rollout's responses (a reward model's or a function's), and the scoring pass.

  def scores(self, rows: dict, texts: list[str], items: list[post.Prompt]) -> np.ndarray:
    if self.reward_fn is not None:
      return np.array([float(self.reward_fn(p.prompt, t, p.metadata)) for p, t in zip(items, texts, strict=True)])
    return np.asarray(jax.device_get(self.rm_score(self.rm_params, rows)), np.float64)

  def advantages(self, out: dict, score_B, mask_BxT, kl_coef: float) -> dict:
    raise NotImplementedError

  def init_params(self, model, key) -> dict:
    params = super().init_params(model, key)
    if not self.uses_values:
      return params
    init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
    return {**params, VALUE_HEAD: init(key, (model.cfg.d_model,), jnp.float32)}

  def evaluator(self, setup, tokenizer, batches, start: int):
    n = min(self.cfg.rl.eval_prompts, len(self.eval.ids))
    ids, items = self.eval.ids[:n], self.eval.items[:n]

    def evaluate(params) -> dict:
      scores, texts, ended, lengths = [], [], [], []
      for lo in range(0, n, batches.rows):  # rollout-sized batches (the last one padded): no new compilation
        chunk = ids[lo : lo + batches.rows]
        padded = chunk + chunk[:1] * (batches.rows - len(chunk))
        rows, chunk_texts, chunk_ended, chunk_lengths, _ = batches.respond(params, padded, temperature=0.0, seed=0)
        chunk_scores = self.scores(
          batches.to_global(rows),
          chunk_texts,
          items[lo : lo + batches.rows] + [items[lo]] * (batches.rows - len(chunk)),
        )
        keep = len(chunk)
        scores.append(chunk_scores[:keep])
        texts += chunk_texts[:keep]
        ended.append(chunk_ended[:keep])
        lengths.append(chunk_lengths[:keep])
      scores, ended, lengths = np.concatenate(scores), np.concatenate(ended), np.concatenate(lengths)
      row = {
        "eval/reward": float(np.mean(scores - self.cfg.rl.missing_eos_penalty * (1 - ended))),
        "eval/score": float(np.mean(scores)),
        "eval/response_length": float(np.mean(lengths)),
        "eval/ended": float(np.mean(ended)),
      }
      for i in range(min(3, n)):
        row[f"samples/{i}"] = f"{items[i].prompt[-1]['content']}\n-> {texts[i]}"
      return row

    return evaluate


def response_rows(tok, prompts: list[list[int]], responses: list[list[int]], seq_len: int, stops: set[int]):
  """(rows in the batch format [N, seq_len], response texts, ended [N], response lengths [N]) of prompts and the
  responses sampled after them (each with the stop token that ended it, if one did): one right-padded sequence a
  row, `loss_mask` on the response's tokens, the stop token included."""
  n = len(prompts)
  rows = {k: np.zeros((n, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  rows["loss_mask"] = np.zeros((n, seq_len), np.float32)
  ended, lengths, texts = np.zeros(n), np.zeros(n), []
  for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
    ids = np.array(prompt + response, np.int32)
    m = len(ids) - 1
    rows["inputs"][i, :m], rows["targets"][i, :m] = ids[:-1], ids[1:]
    rows["segment_ids"][i, :m], rows["positions"][i, :m] = 1, np.arange(m)
    rows["loss_mask"][i, len(prompt) - 1 : m] = 1.0
    ended[i] = bool(response) and response[-1] in stops
    lengths[i] = len(response)
    texts.append(tok.decode([x for x in response if x not in stops]))
  return rows, texts, ended, lengths


def reward_model_setup(cfg, tok):
  """(config, tokenizer, Setup on this run's mesh) of the reward-model run `rl.reward_model`, checked."""
  from lm import state as state_lib  # noqa: PLC0415
  from lm import workdir as workdir_lib  # noqa: PLC0415

  where = cfg.rl.reward_model
  workdir_lib.check_run(where, "rl.reward_model")
  rm_cfg, rm_tok = workdir_lib.load_run(where)
  if rm_cfg.train.objective != "reward":
    objective = rm_cfg.train.objective
    raise UserError(f"rl.reward_model {where} is not a reward model (its train.objective is {objective})")
  if rm_tok.to_bytes() != tok.to_bytes():
    raise UserError(f"rl.reward_model {where} has another tokenizer than this run's")
  return rm_cfg, rm_tok, state_lib.build(rm_cfg, rm_tok.loaded_vocab_size, partitioning.make_mesh(cfg))


def model_params(params: dict) -> dict:
  """The model's params of a policy's (without the value head)."""
  return {k: v for k, v in params.items() if k != VALUE_HEAD}


def value_of(x_BxTxD, head_D):
  """The value head's estimate [B, T] from the policy's final hidden states, whose gradient stops there: the
  value loss trains the head alone and never the policy."""
  return jnp.einsum("btd,d->bt", jax.lax.stop_gradient(x_BxTxD), head_D)


def policy_logits(model, params: dict, batch: dict):
  """(logits [B, T, V] in float32, final hidden states [B, T, D]) of the policy `params` on `batch`."""
  x_BxTxD, head_DxV = model.apply(
    {"params": model_params(params)}, batch["inputs"], batch["segment_ids"], batch["positions"], return_hidden=True
  )
  logits_BxTxV = jnp.einsum(
    "btd,dv->btv", x_BxTxD.astype(model.cfg.dtype), head_DxV.astype(model.cfg.dtype), preferred_element_type=jnp.float32
  )
  return logits_BxTxV, x_BxTxD


def target_logps(logits_BxTxV, targets_BxT, temperature: float = 1.0):
  """(log p(target) [B, T], entropy [B, T]) with p = softmax(logits / temperature): the distribution the rollouts
  sample, as TRL's trainers compute it. At any other temperature than 1 the policy the loss improves would not
  be the one that sampled."""
  if temperature != 1.0:
    logits_BxTxV = logits_BxTxV / temperature
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return logp_BxT, rl.entropy(logits_BxTxV)


def token_logps(model, params: dict, batch: dict, temperature: float = 1.0):
  """(log p(target) [B, T], entropy [B, T], hidden states [B, T, D]) of the policy `params` on `batch` at
  `temperature` (`target_logps`)."""
  logits_BxTxV, x_BxTxD = policy_logits(model, params, batch)
  return *target_logps(logits_BxTxV, batch["targets"], temperature), x_BxTxD


class PPO(RL):
  """PPO against a reward model (or function), with a KL penalty to the reference in the reward."""

  uses_values = True

  def advantages(self, out, score_B, mask_BxT, kl_coef):
    r = self.cfg.rl
    kl_BxT = rl.kl_estimate(out["old_logps"], out["ref_logps"], r.kl_estimator) * mask_BxT
    last_BxT = mask_BxT * (jnp.cumsum(mask_BxT[:, ::-1], axis=1)[:, ::-1] == 1)  # the response's last token
    rewards_BxT = -kl_coef * kl_BxT + last_BxT * score_B[:, None]
    if r.whiten_rewards:
      rewards_BxT = rl.whiten(rewards_BxT, mask_BxT, shift_mean=False)
    advantages_BxT, returns_BxT = rl.gae(rewards_BxT, out["old_values"], mask_BxT, r.gamma, r.lam)
    return {
      "advantages": rl.whiten(advantages_BxT, mask_BxT),
      "returns": returns_BxT,
      "kl_B": jnp.sum(kl_BxT, axis=1),
      "explained_variance": rl.explained_variance(out["old_values"], returns_BxT, mask_BxT),
    }

  def make_loss(self, model):
    r = self.cfg.rl

    def loss(params, batch, rng, frozen):
      del rng, frozen
      mask_BxT = batch["loss_mask"]
      logp_BxT, entropy_BxT, x_BxTxD = token_logps(model, params, batch, r.temperature)
      values_BxT = value_of(x_BxTxD, params[VALUE_HEAD])
      pg_BxT, clipped_BxT, approx_kl_BxT = rl.policy_loss(
        logp_BxT, batch["old_logps"], batch["advantages"], r.cliprange
      )
      vf_BxT, vf_clipped_BxT = rl.value_loss(values_BxT, batch["old_values"], batch["returns"], r.cliprange_value)
      total, normaliser = rl.aggregate(pg_BxT + r.vf_coef * vf_BxT, mask_BxT, r.loss_aggregation)
      metrics = {
        "policy_loss": pg_BxT,
        "value_loss": vf_BxT,
        "clipfrac": clipped_BxT,
        "value_clipfrac": vf_clipped_BxT,
        "approx_kl": approx_kl_BxT,
        "entropy": entropy_BxT,
      }
      return total, normaliser, {k: rl.aggregate(v, mask_BxT, r.loss_aggregation)[0] for k, v in metrics.items()}

    return loss


class GRPO(RL):
  """GRPO: group-normalised advantages, no critic, the KL to the reference in the loss."""

  def advantages(self, out, score_B, mask_BxT, kl_coef):
    r = self.cfg.rl
    adv_B = rl.group_advantages(score_B, r.group_size, r.scale_rewards)
    kl_BxT = rl.kl_estimate(out["old_logps"], out["ref_logps"], "k3") * mask_BxT
    return {
      "advantages": adv_B[:, None] * mask_BxT,
      "returns": jnp.zeros_like(mask_BxT),
      "kl_B": jnp.sum(kl_BxT, axis=1),
    }

  def make_loss(self, model):
    r = self.cfg.rl

    def loss(params, batch, rng, frozen):
      del rng, frozen
      mask_BxT = batch["loss_mask"]
      logp_BxT, entropy_BxT, _ = token_logps(model, params, batch, r.temperature)
      pg_BxT, clipped_BxT, approx_kl_BxT = rl.policy_loss(
        logp_BxT, batch["old_logps"], batch["advantages"], r.cliprange
      )
      kl_BxT = rl.kl_estimate(logp_BxT, batch["ref_logps"], "k3")
      total, normaliser = rl.aggregate(pg_BxT + r.kl_coef * kl_BxT, mask_BxT, r.loss_aggregation)
      metrics = {
        "policy_loss": pg_BxT,
        "kl": kl_BxT,
        "clipfrac": clipped_BxT,
        "approx_kl": approx_kl_BxT,
        "entropy": entropy_BxT,
      }
      return total, normaliser, {k: rl.aggregate(v, mask_BxT, r.loss_aggregation)[0] for k, v in metrics.items()}

    return loss


class Rollouts:
  """The batches of an RL run: a rollout from the current params every `ppo_epochs * num_minibatches` steps,
  handed out a minibatch a step (this process's rows). Its state holds the rollout, so a resume is exact."""

  def __init__(self, objective: RL, process_index: int, process_count: int):
    self.objective, self.cfg = objective, objective.cfg
    c, r = self.cfg, self.cfg.rl
    self.rows = c.train.batch_size * r.num_minibatches
    self.per_rollout = r.ppo_epochs * r.num_minibatches
    self.local = c.train.batch_size // process_count
    self.first = process_index * self.local
    self.batches, self.rollouts, self.kl_coef = 0, 0, float(r.kl_coef)
    self.buffer: dict | None = None  # the current rollout's rows, global, numpy
    self.metrics: dict = {}
    self.rm_step: int | None = None
    self.cycle_start: float | None = None

  # Set-up, once the state exists.

  def begin(self, setup) -> None:
    c, objective = self.cfg, self.objective
    self.setup = setup
    self.tok = objective.tokenizer
    self.sampler = sampling_lib.Sampler.for_model(setup.model, c.data.seq_len, self.tok)
    self.stop = chat.stop_tokens(self.tok)
    self.prompt_length = c.data.seq_len - c.rl.max_new_tokens
    self.sharding = partitioning.batch_sharding(setup.mesh)
    replicated = partitioning.replicated(setup.mesh)
    if c.rl.reward_model:
      self.load_reward_model(setup)
    model = setup.model

    def score_pass(params, frozen, batch):
      t = c.rl.temperature
      logits_BxTxV, x_BxTxD = policy_logits(model, params, batch)
      old_logps, entropy = target_logps(logits_BxTxV, batch["targets"], t)
      ref_logps, _, _ = token_logps(model, objective.reference(params, frozen), batch, t)
      # The sampler records each token's untempered log-prob: the gap is measured at temperature 1.
      untempered = old_logps if t == 1.0 else target_logps(logits_BxTxV, batch["targets"])[0]
      out = {"old_logps": old_logps, "ref_logps": ref_logps, "entropy": entropy, "untempered_logps": untempered}
      if objective.uses_values:
        out["old_values"] = value_of(x_BxTxD, params[VALUE_HEAD]) * batch["loss_mask"]
      else:
        out["old_values"] = jnp.zeros_like(old_logps)
      return out

    self.score_pass = jax.jit(score_pass, out_shardings=replicated)
    self.advantages = jax.jit(objective.advantages, out_shardings=replicated)

  def load_reward_model(self, setup) -> None:
    """The reward model's params on this run's mesh, from its run (at the step a resumed run used)."""
    from lm import workdir as workdir_lib  # noqa: PLC0415
    from lm.objectives import reward  # noqa: PLC0415

    rm_cfg, rm_tok, rm_setup = self.objective.reward_setup
    restored = workdir_lib.restore_newest(self.cfg.rl.reward_model, rm_cfg, rm_tok, rm_setup, self.rm_step)
    self.rm_step, self.objective.rm_params = restored.step, restored.state.params
    self.objective.rm_score = jax.jit(
      lambda params, batch: reward.rewards(rm_setup.model, params, batch),
      out_shardings=partitioning.replicated(setup.mesh),
    )

  # Rollouts.

  def to_global(self, rows: dict) -> dict:
    """Global jax.Arrays of host rows every process holds whole."""
    return {
      k: jax.make_array_from_callback(v.shape, self.sharding, lambda index, v=v: v[index]) for k, v in rows.items()
    }

  def respond(self, params, prompts: list[list[int]], temperature, seed: int):
    """(rows in the batch format [N, seq_len], response texts, ended [N], response lengths [N], the sampler's
    log-probs [N, seq_len]) of the policy's responses to `prompts`, prompt i sampled with seed `seed` + i at
    `temperature` (or its i-th, given one per prompt; 0 is greedy). The log-probs are the untempered ones of each
    sampled token, at its target position (0 off the response)."""
    c = self.cfg
    temperatures = temperature if isinstance(temperature, list) else [temperature] * len(prompts)
    requests = [
      sampling_lib.SamplingParams(c.rl.max_new_tokens, t, stop_tokens=self.stop, seed=(seed + i) % 2**32)
      for i, t in enumerate(temperatures)
    ]
    *_, last = self.sampler.stream(
      model_params(params),
      prompts,
      requests,
      first_chunk=c.rl.max_new_tokens,
      chunk=c.rl.max_new_tokens,
      prompt_length=self.prompt_length,
    )
    rows, texts, ended, lengths = response_rows(
      self.tok, prompts, last.tokens, c.data.seq_len, set(self.stop) | {self.sampler.eos_id}
    )
    logps = np.zeros_like(rows["loss_mask"])
    for i, (prompt, values) in enumerate(zip(prompts, last.logprobs, strict=True)):
      logps[i, len(prompt) - 1 : len(prompt) - 1 + len(values)] = values
    return rows, texts, ended, lengths, logps

  def prompt_indices(self, k: int) -> list[int]:
    """The prompts of rollout k: the next rows / group_size of an order reshuffled every epoch."""
    n, per = len(self.objective.train.ids), self.rows // self.cfg.rl.group_size
    orders = {}  # one permutation per epoch the rollout touches
    out = []
    for j in range(k * per, (k + 1) * per):
      epoch, i = divmod(j, n)
      if epoch not in orders:
        orders[epoch] = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n)
      out.append(int(orders[epoch][i]))
    return out

  def rollout(self, state) -> None:
    """The next rollout from `state`'s params, into `buffer`, with its metrics."""
    c, objective = self.cfg, self.objective
    now = time.perf_counter()
    if self.cycle_start is not None and "rl/rollout_s" in self.metrics:
      cycle = now - self.cycle_start
      update_s = max(cycle - self.metrics["rl/rollout_s"], 1e-9)
      self.metrics["rl/rollout_share"] = self.metrics["rl/rollout_s"] / cycle
      self.metrics["rl/update_tokens_per_s"] = self.per_rollout * c.train.batch_size * c.data.seq_len / update_s
    self.cycle_start = now
    chosen = [i for i in self.prompt_indices(self.rollouts) for _ in range(c.rl.group_size)]
    prompts = [objective.train.ids[i] for i in chosen]
    items = [objective.train.items[i] for i in chosen]
    seed = (c.train.seed * 1_000_003 + self.rollouts * self.rows) % 2**32
    start = time.perf_counter()
    temperatures = [c.rl.temperature] * len(prompts)
    if c.rl.greedy_in_group:  # the greedy reply is scored with its group, so a wrong one is pushed down
      temperatures[:: c.rl.group_size] = [0.0] * (len(prompts) // c.rl.group_size)
    rows, texts, ended, lengths, sampler_logps = self.respond(state.params, prompts, temperatures, seed)
    generate_s = time.perf_counter() - start
    batch = self.to_global(rows)
    score_B = objective.scores(batch, texts, items)
    reward_B = score_B - c.rl.missing_eos_penalty * (1 - ended)
    out = self.score_pass(state.params, state.frozen, batch)
    adv = self.advantages(out, jnp.asarray(reward_B, jnp.float32), batch["loss_mask"], jnp.float32(self.kl_coef))
    host = jax.device_get({**out, **adv})
    mask = rows["loss_mask"]
    self.buffer = {
      **rows,
      "old_logps": host["old_logps"],
      "ref_logps": host["ref_logps"],
      "advantages": host["advantages"],
      "returns": host["returns"],
      "old_values": host["old_values"],
    }
    self.buffer = {k: np.asarray(v) for k, v in self.buffer.items()}
    kl = float(np.mean(host["kl_B"]))
    # The same tokens' log-probs under the sampler's cached decoding and under the training forward pass: the two
    # must agree (to rounding), or the update trains a policy other than the one that sampled.
    gap = np.abs(sampler_logps - host["untempered_logps"]) * mask
    self.metrics.update(
      {
        "rl/score": float(np.mean(score_B)),
        "rl/reward": float(np.mean(reward_B)),
        "rl/reward_with_kl": float(np.mean(reward_B) - self.kl_coef * kl),
        "rl/kl": kl,
        "rl/kl_coef": self.kl_coef,
        "rl/entropy": float(np.sum(host["entropy"] * mask) / max(mask.sum(), 1)),
        "rl/sampler_logp_gap": float(np.sum(gap) / max(mask.sum(), 1)),
        "rl/sampler_logp_gap_max": float(np.max(gap)),
        "rl/response_length": float(np.mean(lengths)),
        "rl/ended": float(np.mean(ended)),
        "rl/rollout_s": time.perf_counter() - now,
        "rl/rollout_tokens_per_s": float(np.sum(lengths)) / generate_s,
        "rl/rollouts": float(self.rollouts + 1),
        "rl/sampler_compiles": float(self.sampler.compiles()),
      }
    )
    if "explained_variance" in host:
      self.metrics["rl/explained_variance"] = float(host["explained_variance"])
    if c.rl.group_size > 1:  # groups whose replies all scored alike teach nothing (TRL's frac_reward_zero_std)
      groups = reward_B.reshape(-1, c.rl.group_size)
      self.metrics["rl/frac_reward_zero_std"] = float(np.mean(groups.std(axis=1) == 0))
    if c.rl.kl_target > 0:  # the proportional controller, after the rollout it measured
      error = float(np.clip(kl / c.rl.kl_target - 1, -0.2, 0.2))
      self.kl_coef *= 1 + error * self.rows / c.rl.kl_horizon
    self.rollouts += 1

  def next(self, state) -> dict:
    """This process's minibatch of the current rollout for the next step (a new rollout when one is used up)."""
    position = self.batches % self.per_rollout
    if position == 0 or self.buffer is None:
      assert position == 0, "a resumed run reads its rollout from the checkpoint"
      self.rollout(state)
    epoch, m = divmod(position, self.cfg.rl.num_minibatches)
    order = np.random.default_rng([self.cfg.train.seed, self.rollouts, epoch]).permutation(self.rows)
    size = self.cfg.train.batch_size
    rows = np.sort(order[m * size : (m + 1) * size])[self.first : self.first + self.local]
    self.batches += 1
    return {k: v[rows] for k, v in self.buffer.items()}

  def __iter__(self):
    return self

  def __next__(self):
    raise TypeError("RL batches depend on the params: the loop asks for them with Objective.next_batch")

  def get_state(self) -> dict:
    state = {"batches": self.batches, "rollouts": self.rollouts, "kl_coef": self.kl_coef, "rm_step": self.rm_step}
    if self.buffer is not None and self.batches % self.per_rollout:
      state["metrics"] = self.metrics  # the rollout's, logged until the next
      state["buffer"] = {k: {"dtype": str(v.dtype), "values": v.tolist()} for k, v in self.buffer.items()}
    return state

  def set_state(self, state: dict) -> None:
    if "rollouts" not in state:
      raise UserError("the checkpoint holds no RL rollout state (was it saved by another objective?)")
    self.batches, self.rollouts, self.kl_coef = int(state["batches"]), int(state["rollouts"]), float(state["kl_coef"])
    self.rm_step = state.get("rm_step")
    self.metrics = dict(state.get("metrics", {}))
    buffer = state.get("buffer")
    self.buffer = None if buffer is None else {k: np.array(v["values"], v["dtype"]) for k, v in buffer.items()}
