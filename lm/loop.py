"""The training loop: batches through the train step, with metrics, hooks, checkpoints, plots and signals.

It owns every side effect of training and knows no objective: the objective's batches come in as an
iterator with `get_state`/`set_state`, its evaluation as a `Hook`. SIGTERM or SIGINT stops the run
after its current step with a committed checkpoint; the processes of a multi-process run agree on the
step to stop at.
"""

import dataclasses
import os
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import distributed, optim, partitioning, plots
from lm import flops as flops_lib
from lm import metrics as metrics_lib
from lm.data import pipeline
from lm.errors import UserError
from lm.state import Setup, TrainState

PLOT_INTERVAL_S = 60.0


@dataclasses.dataclass
class Hook:
  """`fn(step, state) -> metrics`, run after every `every` steps and after the run's last step."""

  every: int
  fn: Callable[[int, TrainState], dict]


class StopFlag:
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


class StopAgreement:
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


def run(
  setup: Setup,
  state: TrainState,
  start: int,
  train_step,
  batches,
  ckpt: checkpoint_lib.Checkpointer,
  path: epath.Path,
  meta: dict,
  hooks: list[Hook] = (),
  progress: bool = True,
) -> dict:
  """Trains from `state` at batch `start` to the run's last step; returns the last value of every metric.

  `batches` gives this process's batches and is checkpointed with the state; `meta` goes into every
  checkpoint. `final["stopped_by"]` names the signal that ended the run early, after a committed
  checkpoint; `final["step"]` is the batches consumed. Tokens (the metrics' token axis, tokens_per_s, MFU)
  are the positions a step computes, `train.batch_size` rows x `data.seq_len`: padding counts, and so do both
  rows of a preference pair; FLOPs per token are the objective's (`Objective.flops_per_token`).
  """
  from tqdm import tqdm  # noqa: PLC0415

  cfg = setup.cfg
  t = cfg.train
  lead = distributed.is_lead()
  tokens_per_step = t.batch_size * cfg.data.seq_len  # positions, padding and both rows of a preference pair included
  flops_per_token, computed_per_token = setup.objective.flops_per_token(setup.model_cfg)
  last_step = optim.run_steps(cfg, setup.model_cfg)  # the schedule's length too
  if t.stop_at_step:  # a stop request, which leaves the schedule as it is
    last_step = min(last_step, t.stop_at_step)
  peak = _peak_flops(cfg.model.dtype)
  poisoned = config_lib.debug_nan_steps(cfg)
  writer = metrics_lib.MetricsWriter(str(path), resume_step=start, enabled=lead)
  batch_sharding = partitioning.batch_sharding(setup.mesh)
  stop = StopFlag()
  stop.install()
  agree = StopAgreement(setup.mesh) if jax.process_count() > 1 else None
  fail_at = int(os.environ.get("LM_DEBUG_FAIL_STEP", 0))  # fault injection for multi-process tests
  distributed.barrier("loop")  # processes that set up at different speeds start their collectives together
  bar = tqdm(total=last_step, initial=start, disable=not (lead and progress), unit="step", dynamic_ncols=True)
  final: dict = {}
  step, streak = start, None
  window_start, window_steps, compile_s = time.perf_counter(), 0, None
  next_plot = time.monotonic() + PLOT_INTERVAL_S
  try:
    while step < last_step:
      local = setup.objective.next_batch(batches, state)
      if step + 1 in poisoned:
        local = {k: v * np.float32(np.nan) if v.dtype.kind == "f" else v for k, v in local.items()}
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
        row.update(setup.objective.log_metrics(batches))
        elapsed = time.perf_counter() - window_start
        if window_steps:
          row["tokens_per_s"] = window_steps * tokens_per_step / elapsed
          row["step_s"] = elapsed / window_steps
          row["mfu"] = row["tokens_per_s"] * flops_per_token / peak  # model FLOPs, train.flops_convention
          row["mfu_computed"] = row["tokens_per_s"] * computed_per_token / peak  # what the step computes
        if step - start <= t.log_every:
          row["compile_s"] = compile_s
        bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}", refresh=False)
      hooked = False
      for hook in hooks:
        if step % hook.every == 0 or step == last_step:
          row.update(hook.fn(step, state))
          hooked = True
      if row:
        writer.write(step, step * tokens_per_step, step * tokens_per_step * flops_per_token, row)
        final.update(row)
        window_start, window_steps = time.perf_counter(), 0
      if step % t.checkpoint_every == 0 or step == last_step or stopping:
        _check_streak(streak, step, t.max_bad_steps, ckpt)
        ckpt.save(step, setup.saved(state), _all_data_states(batches, step), meta, force=True)
      if lead and hooked and (step == last_step or stopping or time.monotonic() > next_plot):
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


def _check_streak(streak, step: int, max_bad: int, ckpt: checkpoint_lib.Checkpointer) -> None:
  """Stops the run once `max_bad` steps in a row were skipped as non-finite."""
  if int(streak) >= max_bad:
    last = ckpt.latest_step()
    kept = "no checkpoint was saved" if last is None else f"the last checkpoint is {last}"
    raise UserError(
      f"steps {step - int(streak) + 1}-{step} all had a non-finite loss or gradient norm "
      f"(train.max_bad_steps={max_bad}); stopped without saving, {kept}"
    )


def _all_data_states(batches, step: int) -> dict:
  """Every shard's data position (process 0 gathers them; orbax writes JSON items from process 0).

  The global shuffle's position is the batches read, the same in every process.
  """
  if "batches" in batches.get_state():
    return batches.get_state()
  gathered = distributed.gather_json(f"data_state/{step}", batches.get_state())
  if gathered is None:
    return batches.get_state()
  return {"shards": {s: st for g in gathered for s, st in g["shards"].items()}}


def _peak_flops(dtype: str) -> float:
  """Peak FLOP/s of the whole slice (CPU devices of one host share its cores)."""
  per_device = flops_lib.peak_flops_per_device(dtype)
  if jax.devices()[0].platform == "cpu":
    return per_device * jax.process_count()
  return per_device * jax.device_count()
