"""Train state, the pure train and eval steps, and the training loop around them.

The steps are pure functions `(state, batch) -> (state, metrics)` compiled with `jax.jit` and
explicit in/out shardings (pjit). The loop owns every side effect: data, metrics, plots,
checkpoints and signals.
"""

import dataclasses
import json
import math
import signal
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
from jax.sharding import Mesh

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import flops as flops_lib
from lm import metrics as metrics_lib
from lm import optim, partitioning, plots
from lm import tokenizer as tokenizer_lib
from lm.data import corpus_builder, pipeline
from lm.errors import UserError
from lm.model import ModelConfig, Transformer, cross_entropy


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data, for anything stochastic in training


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
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return Setup(cfg, model_cfg, model, tx, mesh, rules, shardings, abstract)


def make_train_step(setup: Setup):
  """A jitted `(state, batch) -> (state, metrics)`; the loss is a mean over loss_mask tokens.

  With `optim.grad_accum_steps` = A the batch is split into A interleaved microbatches whose
  summed gradients are divided by the whole batch's token count: the same update as one batch.
  """
  cfg, model = setup.cfg, setup.model
  accum, z_loss = cfg.optim.grad_accum_steps, cfg.model.z_loss
  schedule = optim.make_schedule(cfg)

  def loss_sums(params, batch):
    logits_BxTxV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
    loss_BxT, _ = cross_entropy(logits_BxTxV, batch["targets"], z_loss)
    objective = jnp.sum(loss_BxT * batch["loss_mask"])
    ce = objective if not z_loss else jnp.sum(cross_entropy(logits_BxTxV, batch["targets"])[0] * batch["loss_mask"])
    return objective, ce

  grad_fn = jax.grad(loss_sums, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    if accum == 1:
      grads, ce_sum = grad_fn(state.params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def body(carry, microbatch):
        grads_sum, ce_total = carry
        microbatch = jax.tree.map(
          lambda x: nn.with_logical_constraint(x, ("act_batch",) + (None,) * (x.ndim - 1)), microbatch
        )
        g, ce = grad_fn(state.params, microbatch)
        return (jax.tree.map(jnp.add, grads_sum, g), ce_total + ce), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, ce_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
    grads = jax.tree.map(lambda g: g / n_tokens, grads)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "train/loss": ce_sum / n_tokens,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "lr": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

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


def evaluate(eval_step, params, batches: list[dict]) -> dict[str, float]:
  """Loss (nats/token), perplexity and bits per byte over fixed validation batches."""
  totals = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
  for batch in batches:
    for k, v in jax.device_get(eval_step(params, batch)).items():
      totals[k] += float(v)
  loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
  return {
    "eval/loss": loss,
    "eval/perplexity": math.exp(min(loss, 50.0)),
    "eval/bpb": totals["loss_sum"] / math.log(2) / max(totals["bytes"], 1.0),
  }


class _StopFlag:
  """Set by SIGTERM/SIGINT: the loop finishes its step, checkpoints and exits cleanly."""

  def __init__(self):
    self.signal = None

  def install(self):
    def handler(signum, _):
      self.signal = signal.Signals(signum).name

    self.previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

  def restore(self):
    for s, h in self.previous.items():
      signal.signal(s, h)


def prepare_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> epath.Path:
  """Creates `workdir` (or checks it can resume this config) and writes `config.json`."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"workdir {workdir} exists and is not a directory")
  saved = path / "config.json"
  if saved.exists():
    previous = config_lib.from_json(saved.read_text())
    changed = config_lib.incompatible_changes(previous, cfg)
    if changed:
      raise UserError(f"workdir {workdir} holds a run with a different config: {', '.join(changed)}")
  try:
    path.mkdir(parents=True, exist_ok=True)
    saved.write_text(config_lib.to_json(cfg))
  except OSError as e:
    raise UserError(f"cannot write to workdir {workdir}: {e.strerror or e}") from e
  return path


def load_or_train_tokenizer(cfg, workdir: epath.Path) -> tokenizer_lib.Tokenizer:
  if (workdir / "tokenizer.json").exists():
    return tokenizer_lib.load_tokenizer(workdir)
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    raise UserError(f"{workdir} has checkpoints but its tokenizer is missing (tokenizer.json)")
  tok = tokenizer_lib.train_tokenizer(cfg, corpus_builder.training_text(cfg, cfg.tokenizer.train_bytes))
  if jax.process_index() == 0:
    tok.save(workdir)
  return tok


def train(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics."""
  config_lib.validate(cfg, jax.device_count())
  corpus_builder.prepare(cfg)  # data errors surface before the workdir is touched
  path = prepare_workdir(cfg, workdir)
  tok = load_or_train_tokenizer(cfg, path)
  mesh = partitioning.make_mesh(cfg)
  setup = build(cfg, tok.vocab_size, mesh)
  train_step = make_train_step(setup)
  eval_step = make_eval_step(setup, tok.token_bytes)
  ckpt = checkpoint_lib.Checkpointer(str(path), keep=cfg.train.keep_checkpoints)
  proc, nproc = jax.process_index(), jax.process_count()
  batch_sharding = partitioning.batch_sharding(mesh)
  data = pipeline.make_train_iterator(cfg, tok, proc, nproc)

  with setup.context():
    start = ckpt.latest_step()
    if start is None:
      state, start = setup.init_state(), 0
    else:
      state, data_state, _ = ckpt.restore(start, setup.abstract_state)
      data.set_state(data_state)
    local_eval = pipeline.make_eval_batches(cfg, tok, proc, nproc)
    eval_batches = [pipeline.global_batch(b, batch_sharding) for b in local_eval]
    baseline = None
    if start == 0:
      sample = pipeline.make_train_iterator(cfg, tok, proc, nproc)
      baseline = unigram_loss((next(sample) for _ in range(32)), local_eval, tok.vocab_size)
    return _loop(
      cfg, setup, state, start, train_step, eval_step, eval_batches, data, ckpt, tok, path, progress, baseline
    )


def _loop(
  cfg, setup, state, start, train_step, eval_step, eval_batches, data, ckpt, tok, path, progress, baseline
) -> dict:
  from tqdm import tqdm  # noqa: PLC0415

  t = cfg.train
  lead = jax.process_index() == 0
  tokens_per_step = t.batch_size * cfg.data.seq_len
  flops_per_token = flops_lib.flops_per_token(setup.model_cfg, cfg.data.seq_len, t.flops_convention)
  last_step = t.steps
  if t.max_tokens:
    last_step = min(last_step, math.ceil(t.max_tokens / tokens_per_step))
  if t.max_flops:
    last_step = min(last_step, math.ceil(t.max_flops / (flops_per_token * tokens_per_step)))
  peak = _peak_flops(cfg.model.dtype)
  writer = metrics_lib.MetricsWriter(str(path), resume_step=start, enabled=lead)
  meta = {"config": cfg.to_dict(), "tokenizer": checkpoint_lib.encode_blob(tok.to_bytes())}
  batch_sharding = partitioning.batch_sharding(setup.mesh)
  stop = _StopFlag()
  stop.install()
  bar = tqdm(total=last_step, initial=start, disable=not (lead and progress), unit="step", dynamic_ncols=True)
  final: dict = {}
  step = start
  window_start, window_steps, compile_s = time.perf_counter(), 0, None
  try:
    while step < last_step:
      batch = pipeline.global_batch(next(data), batch_sharding)
      t0 = time.perf_counter()
      state, step_metrics = train_step(state, batch)
      step += 1
      window_steps += 1
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
          row["mfu"] = row["tokens_per_s"] * flops_per_token / peak
        if step - start <= t.log_every:
          row["compile_s"] = compile_s
        bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}", refresh=False)
      if step % t.eval_every == 0 or step == last_step:
        row.update(evaluate(eval_step, state.params, eval_batches))
        if baseline is not None:
          row["eval/unigram_loss"], baseline = baseline, None  # logged once, with the first eval
      if row:
        writer.write(step, step * tokens_per_step, step * tokens_per_step * flops_per_token, row)
        final.update(row)
        window_start, window_steps = time.perf_counter(), 0
      if step % t.checkpoint_every == 0 or step == last_step or stop.signal:
        ckpt.save(step, state, data.get_state(), meta, force=True)
      if lead and "eval/loss" in row:
        plots.plot_runs([str(path)], str(path / "plots"))
      bar.update(1)
      if stop.signal:
        break
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
    stop.restore()
  if stop.signal and lead:
    print(f"received {stop.signal}: saved checkpoint at step {step}; rerun the same command to resume")
  final["step"] = step
  return final


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
