"""Train state, the pure train and eval steps, and the training loop around them.

The steps are pure functions `(state, batch) -> (state, metrics)` compiled with `jax.jit` and
explicit in/out shardings (pjit). The loop owns every side effect: data, metrics, plots,
checkpoints and signals.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import distributed, environment, optim, partitioning, plots, sampling
from lm import flops as flops_lib
from lm import metrics as metrics_lib
from lm import tokenizer as tokenizer_lib
from lm.data import corpus_builder, pipeline
from lm.errors import UserError
from lm.model import ModelConfig, Transformer, cross_entropy, head_loss

PLOT_INTERVAL_S = 60.0


@flax.struct.dataclass
class TrainState:
  """The whole training state; batches consumed = `step + skipped_steps` = the checkpoint's step."""

  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data, split every batch: one half for the step's randomness, one kept here
  skipped_steps: jax.Array  # int32 scalar: batches whose update was skipped for a non-finite loss or gradient
  nonfinite_streak: jax.Array  # int32 scalar: how many of the latest batches in a row were skipped
  schedule: optim.ScheduleClock  # where the run is in its lr schedule (stretched when a resume changes its length)


@dataclasses.dataclass
class Setup:
  """Everything derived from a config and a vocabulary size, before any array exists."""

  cfg: ml_collections.ConfigDict
  model_cfg: ModelConfig
  model: Transformer
  tx: optax.GradientTransformation
  mesh: Mesh
  rules: tuple
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying shardings

  def init_state(self) -> TrainState:
    """A freshly initialised state, created directly in its sharded layout."""
    init = jax.jit(lambda key: nn.unbox(_init(self.model, self.tx, key, self.cfg)), out_shardings=self.state_shardings)
    with self.context():
      return init(jax.random.key(self.cfg.train.seed))

  def context(self):
    return _Context(self.mesh, self.rules)


class _Context:
  """`jax.set_mesh` plus linen's logical axis rules, for tracing and running steps."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._mesh = jax.set_mesh(self.mesh)
    self._mesh.__enter__()
    self._rules = nn.logical_axis_rules(self.rules)
    self._rules.__enter__()

  def __exit__(self, *exc):
    self._rules.__exit__(*exc)
    self._mesh.__exit__(*exc)


def _init(model: Transformer, tx, key, cfg) -> TrainState:
  init_key, train_key = jax.random.split(key)
  tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
  params = model.init(init_key, tokens)["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(nn.unbox(params)),
    rng=jax.random.key_data(train_key),
    skipped_steps=jnp.zeros((), jnp.int32),
    nonfinite_streak=jnp.zeros((), jnp.int32),
    schedule=optim.fresh_clock(cfg, optim.run_steps(cfg, model.cfg)),
  )


def build(cfg: ml_collections.ConfigDict, vocab_size: int, mesh: Mesh) -> Setup:
  """Model, optimizer, sharding rules and the state's shardings, without allocating it."""
  model_cfg = ModelConfig.from_config(cfg, vocab_size)
  model = Transformer(model_cfg)
  tx = optim.make_optimizer(cfg)
  rules = partitioning.rules_for(model_cfg, mesh)
  boxed = jax.eval_shape(lambda key: _init(model, tx, key, cfg), jax.random.key(0))
  param_shardings = partitioning.logical_shardings(boxed.params, mesh, rules)
  replicated = partitioning.replicated(mesh)
  opt_shardings = optax.tree_map_params(
    tx, lambda _, sharding: sharding, boxed.opt_state, param_shardings, transform_non_params=lambda _: replicated
  )
  shardings = TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=opt_shardings,
    rng=replicated,
    skipped_steps=replicated,
    nonfinite_streak=replicated,
    schedule=jax.tree.map(lambda _: replicated, boxed.schedule),
  )
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return Setup(cfg, model_cfg, model, tx, mesh, rules, shardings, abstract)


def make_train_step(setup: Setup):
  """A jitted `(state, batch) -> (state, metrics)`; the loss is a mean over loss_mask tokens.

  With `optim.grad_accum_steps` = A the batch is split into A interleaved microbatches whose
  summed gradients are divided by the whole batch's token count: the same update as one batch.
  A batch whose loss or gradient norm is not finite leaves params, optimizer state and `step`
  as they were and counts in `skipped_steps` and `nonfinite_streak` (also returned as metrics).
  Every batch, skipped or not, splits `state.rng` once: the model gets one half as its `dropout`
  rng (each microbatch its own fold), the state keeps the other. The lr comes from the state's
  schedule clock, re-set on the first step after a resume that changed the run's length
  (`lm.optim.reset_clock`).
  """
  cfg, model = setup.cfg, setup.model
  accum, z_loss = cfg.optim.grad_accum_steps, cfg.model.z_loss
  total = optim.run_steps(cfg, setup.model_cfg)

  def loss_sums(params, batch, key):
    x_BxTxD, head_DxV = model.apply(
      {"params": params},
      batch["inputs"],
      batch["segment_ids"],
      batch["positions"],
      return_hidden=True,
      rngs={"dropout": key},
    )
    return head_loss(x_BxTxD, head_DxV, batch["targets"], batch["loss_mask"], z_loss, model.cfg.dtype)

  grad_fn = jax.grad(loss_sums, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    if accum == 1:
      grads, ce_sum = grad_fn(state.params, batch, step_key)
    else:
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, indexed):
        grads_sum, ce_total = carry
        i, microbatch = indexed
        microbatch = jax.tree.map(
          lambda x: nn.with_logical_constraint(x, ("act_batch",) + (None,) * (x.ndim - 1)), microbatch
        )
        g, ce = grad_fn(state.params, microbatch, jax.random.fold_in(step_key, i))
        return (jax.tree.map(jnp.add, grads_sum, g), ce_total + ce), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, ce_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(accum), micro))
    grads = jax.tree.map(lambda g: g / n_tokens, grads)
    loss, grad_norm = ce_sum / n_tokens, optax.tree.norm(grads)
    clock = optim.reset_clock(cfg, state.schedule, state.step, total)
    lr = optim.learning_rate(cfg, clock, state.step)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state)
    )
    bad = 1 - finite.astype(jnp.int32)
    skipped, streak = state.skipped_steps + bad, (state.nonfinite_streak + 1) * bad
    metrics = {
      "train/loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(params),
      "lr": lr,
      "train/skipped_steps": skipped,
      "nonfinite_streak": streak,
    }
    new_state = state.replace(
      step=state.step + 1 - bad,
      params=params,
      opt_state=opt_state,
      rng=jax.random.key_data(next_key),
      skipped_steps=skipped,
      nonfinite_streak=streak,
      schedule=clock,
    )
    return new_state, metrics

  batch_sharding = partitioning.batch_sharding(setup.mesh)
  return jax.jit(
    step,
    in_shardings=(setup.state_shardings, batch_sharding),
    out_shardings=(setup.state_shardings, partitioning.replicated(setup.mesh)),
    donate_argnums=(0,),
  )


def make_eval_step(setup: Setup, token_bytes: np.ndarray):
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


def evaluate(eval_step, params, batches: list[dict], prefix: str = "eval/") -> dict[str, float]:
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
    if not is_lead():
      continue
    source = cfg.data.source if not name else config_lib.eval_sources(cfg)[name][0]
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


class _StopFlag:
  """Set by SIGTERM/SIGINT: the loop finishes its step, checkpoints and exits cleanly.

  The first signal only sets the flag; a second one meets the previous handler, so Ctrl-C twice
  stops at once.
  """

  def __init__(self):
    self.signal = None

  def install(self):
    def handler(signum, _):
      self.signal = signal.Signals(signum).name
      self.restore()

    self.previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

  def restore(self):
    for s, h in self.previous.items():
      signal.signal(s, h)


def _nearest_existing(path: epath.Path) -> epath.Path:
  path = path.absolute()
  while not path.exists() and path != path.parent:
    path = path.parent
  return path


def check_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """Checks, writing nothing, that `workdir` is new or holds a run that `cfg` can resume."""
  path = epath.Path(workdir)
  existing = _nearest_existing(path)
  if not existing.is_dir():
    if existing == path.absolute():
      raise UserError(f"workdir {workdir} exists and is not a directory")
    raise UserError(f"workdir {workdir} cannot be created: {existing} is not a directory")
  saved = path / "config.json"
  if saved.exists():
    try:
      previous = config_lib.from_json(saved.read_text())
    except (ValueError, TypeError, UserError) as e:
      raise UserError(f"cannot read {saved}: {e}") from None
    changed = config_lib.incompatible_changes(previous, cfg)
    if changed:
      raise UserError(f"workdir {workdir} holds a run with a different config: {', '.join(changed)}")
  metrics_lib.read_metrics(workdir)  # a corrupt metrics.jsonl stops the run here, not after the first write
  return path


def resolve_shards(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`cfg` with `data.shards` fixed: the run's own if it has started before, else the process count.

  A run keeps its shard count for life, so its batches do not depend on how many processes
  resume it; runs from before sharded reading read one shard.
  """
  if cfg.data.shards:
    return cfg
  cfg = config_lib.from_json(config_lib.to_json(cfg))  # a copy
  saved = epath.Path(workdir) / "config.json"
  if not saved.exists() and cfg.train.init_from:  # a branch reads its data as its source run did
    saved = epath.Path(cfg.train.init_from.rstrip("/")).parent.parent / "config.json"
  try:
    previous = json.loads(saved.read_text()) if saved.exists() else None
  except (OSError, ValueError):
    previous = None  # check_workdir reports an unreadable config
  if previous is None:
    cfg.data.shards = jax.process_count()
  else:
    cfg.data.shards = previous.get("data", {}).get("shards") or 1
  return cfg


def is_lead() -> bool:
  """Whether this process writes the run's files and console output (process 0 of a multi-process run)."""
  return jax.process_index() == 0


def load_or_train_tokenizer(cfg, workdir: epath.Path) -> tokenizer_lib.Tokenizer:
  """The workdir's tokenizer, checked against the config, or else a new one (saved by `write_workdir`)."""
  if (workdir / "tokenizer.json").exists():
    try:
      tok = tokenizer_lib.load_tokenizer(workdir)
    except (ValueError, KeyError, RuntimeError) as e:
      raise UserError(f"cannot read the tokenizer in {workdir}: {type(e).__name__}: {e}") from None
    t = cfg.tokenizer
    if tok.kind != t.kind or (t.kind == "sentencepiece" and tok.vocab_size != t.vocab_size):
      wanted = "byte tokenizer" if t.kind == "byte" else f"sentencepiece tokenizer of {t.vocab_size} tokens"
      raise UserError(f"{workdir} holds a {tok.kind} tokenizer of {tok.vocab_size} tokens, not the configured {wanted}")
    return tok
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    raise UserError(f"{workdir} has checkpoints but its tokenizer is missing (tokenizer.json)")
  return tokenizer_lib.train_tokenizer(cfg, corpus_builder.training_text(cfg, cfg.tokenizer.train_bytes))


def check_checkpoint(cfg, tok: tokenizer_lib.Tokenizer, directory: str, step: int, meta: dict) -> None:
  """Raises UserError unless checkpoint `step` (its `meta` item) was written by a run `cfg` can resume."""
  where = f"checkpoint {step} in {directory}"
  if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or "tokenizer" not in meta:
    raise UserError(f"{where} holds no run metadata: it was not written by lm")
  try:
    saved = config_lib.from_json(json.dumps(meta["config"]))
  except UserError as e:
    raise UserError(f"{where} has a config this version cannot read: {e}") from None
  changed = config_lib.incompatible_changes(saved, cfg)
  if changed:
    raise UserError(f"{where} is from a run with a different config: {', '.join(changed)}")
  if checkpoint_lib.decode_blob(meta["tokenizer"]) != tok.to_bytes():
    raise UserError(f"{where} was trained with a different tokenizer than the one in {directory}")


def restore_branch_source(cfg, tok: tokenizer_lib.Tokenizer, setup: Setup) -> checkpoint_lib.Restored:
  """The state and data position saved in `train.init_from` (WORKDIR/checkpoints/STEP), for a run that branches there.

  The checkpoint must be the newest of its run, and its config one that this config could resume: typically
  the branch differs in `train.steps` only, so that a WSD schedule cools down from STEP (Hägele et al. 2024).
  """
  source = epath.Path(cfg.train.init_from.rstrip("/"))
  workdir, step = str(source.parent.parent), int(source.name)

  def check(found: int, meta: dict) -> None:
    if found != step:
      raise UserError(f"train.init_from names checkpoint {step}, but the newest checkpoint of {workdir} is {found}")
    check_checkpoint(cfg, tok, workdir, found, meta)

  restored = checkpoint_lib.restore_latest(workdir, setup.abstract_state, check)
  if restored is None:
    raise UserError(f"train.init_from: {workdir} has no checkpoints")
  return dataclasses.replace(restored, damaged=[])  # damage in the source run is not this run's to clean up


def check_free_space(cfg, path: epath.Path, abstract_state) -> None:
  """Refuses to start when the workdir's filesystem has less than `train.min_free_bytes` free.

  The default (-1) asks for room for two checkpoints: twice the bytes of params and optimizer state.
  """
  need = cfg.train.min_free_bytes
  if need == -1:
    need = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  if not need or "://" in str(path):
    return
  free = shutil.disk_usage(_nearest_existing(path)).free
  if free < need:
    raise UserError(
      f"only {free / 2**20:,.1f} MiB free on the filesystem of workdir {path}, but {need / 2**20:,.1f} MiB "
      "are needed (room for two checkpoints; train.min_free_bytes sets this)"
    )


def write_workdir(cfg, path: epath.Path, tok: tokenizer_lib.Tokenizer) -> None:
  """Creates `path` and writes `config.json`, `environment.json` and the tokenizer: the run's first writes."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      metrics_lib.replace_text(path / "config.json", config_lib.to_json(cfg))
      metrics_lib.replace_text(path / "environment.json", json.dumps(environment.versions(), indent=2) + "\n")
      if not (path / "tokenizer.json").exists():
        staging = path / "tokenizer.tmp"
        tok.save(staging)
        for name in ("tokenizer.model", "tokenizer.json"):  # the json last: it marks a complete tokenizer
          if (staging / name).exists():
            (staging / name).replace(path / name)
        staging.rmdir()
  except OSError as e:
    raise UserError(f"cannot write to workdir {path}: {e.strerror or e}") from None


def train(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  Everything a user can get wrong (config, data, workdir, tokenizer, checkpoints, disk space) is
  checked before the first write to the workdir. It resumes from the newest checkpoint that
  restores, setting damaged newer ones aside. `final["stopped_by"]` names the signal that ended
  the run early, after a committed checkpoint.
  """
  cfg = resolve_shards(cfg, workdir)
  config_lib.validate(cfg, jax.device_count())
  pipeline.prepare_all(cfg)  # data errors surface before the workdir is touched
  path = check_workdir(cfg, workdir)
  tok = load_or_train_tokenizer(cfg, path)
  proc, nproc = jax.process_index(), jax.process_count()
  data = pipeline.make_train_iterator(cfg, tok, proc, nproc)  # tokenizes the train split: errors before writes
  lookahead = pipeline.make_train_iterator(cfg, tok, proc, nproc) if cfg.train.eval_next_train_batches else None
  mesh = partitioning.make_mesh(cfg)
  setup = build(cfg, tok.vocab_size, mesh)
  with setup.context():
    restored = checkpoint_lib.restore_latest(
      str(path), setup.abstract_state, functools.partial(check_checkpoint, cfg, tok, workdir)
    )
    if restored is None and cfg.train.init_from:
      restored = restore_branch_source(cfg, tok, setup)
  check_free_space(cfg, path, setup.abstract_state)
  write_workdir(cfg, path, tok)
  if restored and restored.damaged:
    if jax.process_index() == 0:
      for step, reason in restored.damaged:
        moved = checkpoint_lib.set_aside(str(path), step)
        print(
          f"lm: warning: checkpoint {step} in {workdir} is damaged ({reason}); moved it to {moved} and resuming "
          f"from checkpoint {restored.step}",
          file=sys.stderr,
        )
  # Every process has looked for checkpoints (and set damaged ones aside) before any creates the directory.
  multihost_utils.sync_global_devices("lm: checkpoints read")
  train_step = make_train_step(setup)
  eval_step = make_eval_step(setup, tok.token_bytes)
  ckpt = checkpoint_lib.Checkpointer(str(path), keep=cfg.train.keep_checkpoints)
  batch_sharding = partitioning.batch_sharding(mesh)

  with setup.context():
    if restored is None:
      state, start = setup.init_state(), 0
    else:
      state, start = restored.state, restored.step
      data.set_state(restored.data_state)
    local_sets = pipeline.make_eval_sets(cfg, tok, proc, nproc)
    eval_sets = {n: [pipeline.global_batch(b, batch_sharding) for b in s.batches] for n, s in local_sets.items()}
    eval_sizes = describe_eval_sets(cfg, local_sets)
    baseline = None
    if start < cfg.train.eval_every:  # the first eval, which logs the baseline, is still to come
      sample = pipeline.make_train_iterator(cfg, tok, proc, nproc)
      baseline = unigram_loss((next(sample) for _ in range(32)), local_sets[""].batches, tok.vocab_size)
    return _loop(
      cfg,
      setup,
      state,
      start,
      train_step,
      eval_step,
      eval_sets,
      eval_sizes,
      data,
      lookahead,
      ckpt,
      tok,
      path,
      progress,
      baseline,
    )


def _check_streak(streak, step: int, max_bad: int, ckpt: checkpoint_lib.Checkpointer) -> None:
  """Stops the run once `max_bad` steps in a row were skipped as non-finite."""
  if int(streak) >= max_bad:
    last = ckpt.latest_step()
    kept = "no checkpoint was saved" if last is None else f"the last checkpoint is {last}"
    raise UserError(
      f"steps {step - int(streak) + 1}-{step} all had a non-finite loss or gradient norm "
      f"(train.max_bad_steps={max_bad}); stopped without saving, {kept}"
    )


def _loop(
  cfg,
  setup,
  state,
  start,
  train_step,
  eval_step,
  eval_sets,
  eval_sizes,
  data,
  lookahead,
  ckpt,
  tok,
  path,
  progress,
  baseline,
) -> dict:
  from tqdm import tqdm  # noqa: PLC0415

  t = cfg.train
  lead = jax.process_index() == 0
  tokens_per_step = t.batch_size * cfg.data.seq_len
  flops_per_token = flops_lib.flops_per_token(setup.model_cfg, cfg.data.seq_len, t.flops_convention)
  computed_per_token = flops_lib.flops_per_token_computed(setup.model_cfg, cfg.data.seq_len)
  last_step = optim.run_steps(cfg, setup.model_cfg)  # the schedule's length too
  if t.stop_at_step:  # a stop request, which leaves the schedule as it is
    last_step = min(last_step, t.stop_at_step)
  peak = _peak_flops(cfg.model.dtype)
  poisoned = config_lib.debug_nan_steps(cfg)
  writer = metrics_lib.MetricsWriter(str(path), resume_step=start, enabled=lead)
  meta = {
    "config": cfg.to_dict(),
    "tokenizer": checkpoint_lib.encode_blob(tok.to_bytes()),
    "versions": environment.versions(),
  }
  batch_sharding = partitioning.batch_sharding(setup.mesh)
  stop = _StopFlag()
  stop.install()
  agree = _StopAgreement(setup.mesh) if jax.process_count() > 1 else None
  fail_at = int(os.environ.get("LM_DEBUG_FAIL_STEP", 0))  # fault injection for multi-process tests
  distributed.barrier("loop")  # processes that set up at different speeds start their collectives together
  bar = tqdm(total=last_step, initial=start, disable=not (lead and progress), unit="step", dynamic_ncols=True)
  final: dict = {}
  step, streak = start, None
  window_start, window_steps, compile_s = time.perf_counter(), 0, None
  samples = sampling.EvalSamples(cfg, setup.model, tok) if t.sample_prompts else None
  next_plot = time.monotonic() + PLOT_INTERVAL_S
  try:
    while step < last_step:
      local = next(data)
      if step + 1 in poisoned:
        local = {**local, "loss_mask": local["loss_mask"] * np.float32(np.nan)}
      batch = pipeline.global_batch(local, batch_sharding)
      t0 = time.perf_counter()
      state, step_metrics = train_step(state, batch)
      step += 1
      window_steps += 1
      if step == fail_at:
        raise RuntimeError(f"injected failure at step {step} (LM_DEBUG_FAIL_STEP)")
      stopping = stop.signal if agree is None else agree.after_step(stop.signal)
      if streak is not None:  # the previous step's, read while this one runs
        _check_streak(streak, step - 1, t.max_bad_steps, ckpt)
      streak = step_metrics.pop("nonfinite_streak")
      if compile_s is None:
        jax.block_until_ready(state.step)
        compile_s = time.perf_counter() - t0
        window_start, window_steps = time.perf_counter(), 0
      row = {}
      if step % t.log_every == 0 or step == last_step:
        row.update({k: float(v) for k, v in jax.device_get(step_metrics).items()})
        elapsed = time.perf_counter() - window_start
        if window_steps:
          row["tokens_per_s"] = window_steps * tokens_per_step / elapsed
          row["step_s"] = elapsed / window_steps
          row["mfu"] = row["tokens_per_s"] * flops_per_token / peak  # model FLOPs, train.flops_convention
          row["mfu_computed"] = row["tokens_per_s"] * computed_per_token / peak  # what the step computes
        if step - start <= t.log_every:
          row["compile_s"] = compile_s
        bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}", refresh=False)
      if step % t.eval_every == 0 or step == last_step:
        for name, eval_batches in eval_sets.items():
          row.update(evaluate(eval_step, state.params, eval_batches, eval_prefix(name)))
        row.update(eval_sizes)
        if lookahead is not None:
          upcoming = next_train_batches(lookahead, data, len(eval_sets[""]), batch_sharding)
          row["eval/next_train_batches_loss"] = evaluate(eval_step, state.params, upcoming)["eval/loss"]
        if baseline is not None:
          row["eval/unigram_loss"], baseline = baseline, None  # logged once, with the first eval
        if samples is not None:
          texts = samples(state.params)
          row.update(texts)
          if writer.tb is not None:  # TensorBoard shows them as text; a code block keeps the whitespace
            for tag, text in texts.items():
              writer.tb.add_text(tag, f"```\n{text}\n```", global_step=step)
      if row:
        writer.write(step, step * tokens_per_step, step * tokens_per_step * flops_per_token, row)
        final.update(row)
        window_start, window_steps = time.perf_counter(), 0
      if step % t.checkpoint_every == 0 or step == last_step or stopping:
        _check_streak(streak, step, t.max_bad_steps, ckpt)
        ckpt.save(step, state, _all_data_states(data, step), meta, force=True)
      if lead and "eval/loss" in row and (step == last_step or stopping or time.monotonic() > next_plot):
        plots.plot_runs([str(path)], str(path / "plots"))  # a second or two: at most once a minute, and at the end
        next_plot = time.monotonic() + PLOT_INTERVAL_S
      bar.update(1)
      if stopping:
        final["stopped_by"] = stopping
        break
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    stop.restore()
  final["step"] = step
  return final


class _StopAgreement:
  """Makes the processes of a run stop at the same step when any of them gets a signal.

  After each step every process contributes its flag to a tiny all-reduce (queued behind the step,
  never waited for at once); the result is read one step later, when the loop already waits for
  that step's metrics. All processes read the same value after the same step, so they checkpoint
  the same step and exit together.
  """

  def __init__(self, mesh: Mesh):
    self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    self.reduce = jax.jit(jnp.max, out_shardings=partitioning.replicated(mesh))
    self.pending = None

  def after_step(self, signal_name: str | None) -> str | None:
    local = np.full(jax.local_device_count(), signal_name is not None, np.int32)
    flags = jax.make_array_from_process_local_data(self.sharding, local, (jax.device_count(),))
    previous, self.pending = self.pending, self.reduce(flags)
    if previous is not None and int(previous):
      return signal_name or "a signal to another process"
    return None


def _all_data_states(data, step: int) -> dict:
  """Every shard's data position (process 0 gathers them; orbax writes JSON items from process 0).

  The global shuffle's position is the batches read, the same in every process.
  """
  if "batches" in data.get_state():
    return data.get_state()
  gathered = distributed.gather_json(f"data_state/{step}", data.get_state())
  if gathered is None:
    return data.get_state()
  return {"shards": {s: st for g in gathered for s, st in g["shards"].items()}}


def _peak_flops(dtype: str) -> float:
  """Peak FLOP/s of the whole slice (CPU devices of one host share its cores)."""
  per_device = flops_lib.peak_flops_per_device(dtype)
  if jax.devices()[0].platform == "cpu":
    return per_device * jax.process_count()
  return per_device * jax.device_count()


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, tokenizer_lib.Tokenizer]:
  """The config and tokenizer a workdir was trained with."""
  path = epath.Path(workdir)
  if not (path / "config.json").exists():
    raise UserError(f"{workdir} is not a run directory (no config.json)")
  return config_lib.from_json((path / "config.json").read_text()), tokenizer_lib.load_tokenizer(path)


def summary(cfg: ml_collections.ConfigDict, vocab_size: int) -> str:
  """One line: parameter counts and FLOPs per token of the configured model."""
  model_cfg = ModelConfig.from_config(cfg, vocab_size)
  counts = flops_lib.param_counts(model_cfg)
  fpt = flops_lib.flops_per_token(model_cfg, cfg.data.seq_len, cfg.train.flops_convention)
  return json.dumps({"params": counts, "flops_per_token": fpt, "convention": cfg.train.flops_convention})
