"""`lm train`: checks a run, sets it up and hands it to the loop, whatever its objective.

The rooms it connects: the workdir (`lm.workdir`), the objective (`lm.objectives`), the state
(`lm.state`), the pure train step (`lm.step`) and the loop that owns every side effect (`lm.loop`).
"""

import sys

import jax
import ml_collections
from jax.experimental import multihost_utils

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import distributed, loop, objectives, partitioning
from lm import state as state_lib
from lm import step as step_lib
from lm import workdir as workdir_lib


def train(cfg: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  Everything a user can get wrong (config, data, workdir, tokenizer, checkpoints, `train.init_from`,
  disk space) is checked before the first write to the workdir. It resumes from the newest checkpoint
  that restores, setting damaged newer ones aside; a run without one starts from `train.init_from`, if
  set, or afresh. `final["stopped_by"]` names the signal that ended the run early, after a committed
  checkpoint.
  """
  cfg = workdir_lib.resolve_shards(cfg, workdir)
  config_lib.validate(cfg, jax.device_count())
  objective = objectives.create(cfg)
  objective.prepare()  # data errors surface before the workdir is touched
  path = workdir_lib.check_workdir(cfg, workdir)
  tok = workdir_lib.load_or_train_tokenizer(cfg, path)
  batches = objective.train_batches(tok, jax.process_index(), jax.process_count())  # errors before writes
  setup = state_lib.build(cfg, tok.loaded_vocab_size, partitioning.make_mesh(cfg), objective)
  restored = workdir_lib.restore(cfg, tok, setup, str(path))
  start = workdir_lib.start_params(cfg, tok, setup) if restored is None else None
  workdir_lib.check_free_space(cfg, path, setup.saved(setup.abstract_state))
  workdir_lib.write_workdir(cfg, path, tok, start.record if start else None)
  if restored and restored.damaged and distributed.is_lead():
    for step, reason in restored.damaged:
      moved = checkpoint_lib.set_aside(str(path), step)
      print(
        f"lm: warning: checkpoint {step} in {workdir} is damaged ({reason}); moved it to {moved} and resuming "
        f"from checkpoint {restored.step}",
        file=sys.stderr,
      )
  # Every process has looked for checkpoints (and set damaged ones aside) before any creates the directory.
  multihost_utils.sync_global_devices("lm: checkpoints read")
  train_step = step_lib.make_train_step(setup)
  ckpt = checkpoint_lib.Checkpointer(str(path), keep=cfg.train.keep_checkpoints)
  meta = workdir_lib.checkpoint_meta(cfg, tok)
  init_record = start.record if start else workdir_lib.read_init_record(path)
  if init_record is not None:
    meta["init_from"] = init_record
  if setup.model_cfg.lora_rank:  # its checkpoints leave the base weights out, but say where they are
    meta["lora_base"] = start.lora_base if start else restored.meta["lora_base"]
  with setup.context():
    if restored is None:
      state, first = setup.init_state(start.params if start else None), 0
    else:
      state, first = restored.state, restored.step
      if restored.data_state:  # an imported checkpoint (lm import hf) has read no data: its data starts afresh
        batches.set_state(restored.data_state)
    del start, restored  # the source's params live on in the state alone
    objective.begin(setup, state, batches, first)  # e.g. DPO's reference log-probs, from the starting params
    evaluate = objective.evaluator(setup, tok, batches, first)
    if cfg.train.evals:
      evaluate = with_downstream_evals(evaluate, cfg, tok, setup)
    hooks = [loop.Hook(cfg.train.eval_every, lambda step, s: evaluate(s.params))]
    return loop.run(setup, state, first, train_step, batches, ckpt, path, meta, hooks, progress)


def with_downstream_evals(evaluate, cfg, tok, setup):
  """`evaluate` that also runs the tasks of `train.evals` (`lm.evals.tasks`) on the params being trained and
  logs each metric as eval/TASK/METRIC. The tasks are resolved (and their files read) before training starts."""
  from lm.evals import scoring, tasks  # noqa: PLC0415

  chosen = [tasks.resolve(name) for name in cfg.train.evals]
  t = cfg.train
  scorer = scoring.Scorer(cfg, tok, setup, None, batch_size=scoring.Scorer.rows_for(setup, t.batch_size))

  def both(params) -> dict:
    row = evaluate(params)
    scorer.params = params  # one scorer, so its sampler compiles once for the run
    for task in chosen:
      summary, _ = tasks.evaluate(scorer, task, t.evals_shots, t.evals_limit, cfg.train.seed)
      row.update({f"eval/{task.name}/{k}": v for k, v in summary.items() if isinstance(v, float)})
    return row

  return both
