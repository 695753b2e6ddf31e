"""`lm lora merge --workdir DIR --out DIR2`: a LoRA run's adapters folded into a plain run.

DIR2 gets DIR's config with `model.lora_rank = 0` and no `train.init_from` (it needs no other run), the
tokenizer, `merged_from.json` (the LoRA run, its step and its base run) and one checkpoint at DIR's newest
step: the merged params (`lm.lora.merge_lora`, W + (alpha / R) A B in f32), fresh optimizer moments, and
DIR's counters, RNG, schedule clock and data position. `lm sample`, `lm chat` and `train.init_from` open
it as any run; `lm train` on it would go on as a full fine-tune from the merged weights.
"""

import json

from etils import epath

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import lora, state
from lm import metrics as metrics_lib
from lm import workdir as workdir_lib
from lm.errors import UserError


def merge_run(workdir: str, out: str) -> None:
  """Writes the plain run `out` that computes what the newest checkpoint of the LoRA run in `workdir` does.

  UserError, before anything is written, if `out` exists and is not an empty directory, if `workdir` holds no
  LoRA run, or if its checkpoint or base run cannot be loaded.
  """
  target = epath.Path(out)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise UserError(f"--out {out} exists and is not an empty directory")
  cfg, _ = workdir_lib.load_run(workdir)
  if not cfg.model.lora_rank:
    raise UserError(f"{workdir} is not a LoRA run (its model.lora_rank is 0): there is nothing to merge")
  cfg, tok, setup, restored = workdir_lib.load_checkpoint(workdir)
  merged_cfg = config_lib.from_json(config_lib.to_json(cfg))  # a copy
  merged_cfg.model.lora_rank = 0
  merged_cfg.train.init_from = ""
  merged_setup = state.build(merged_cfg, tok.loaded_vocab_size, setup.mesh)
  with merged_setup.context():
    fresh = merged_setup.init_state(lora.merge_lora(restored.state.params, setup.model_cfg))
  lora_state = restored.state
  merged_state = fresh.replace(
    step=lora_state.step,
    rng=lora_state.rng,
    skipped_steps=lora_state.skipped_steps,
    nonfinite_streak=lora_state.nonfinite_streak,
    schedule=lora_state.schedule,
  )
  record = {"run": str(epath.Path(workdir).absolute()), "step": restored.step, "lora_base": restored.meta["lora_base"]}
  workdir_lib.write_workdir(merged_cfg, target, tok)
  metrics_lib.replace_text(target / "merged_from.json", json.dumps(record, indent=2) + "\n")
  meta = {**workdir_lib.checkpoint_meta(merged_cfg, tok), "merged_from": record}
  ckpt = checkpoint_lib.Checkpointer(out, keep=1)
  try:
    ckpt.save(restored.step, merged_state, restored.data_state, meta, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  print(f"merged the adapters of {workdir} at step {restored.step} into {out}")
