"""What a run directory holds, and how it is checked, opened and started.

A workdir holds `config.json`, `environment.json`, the tokenizer (`tokenizer.json`, and
`tokenizer.model` for sentencepiece), `checkpoints/`, `metrics.jsonl`, `tb/` and `plots/`; a run
started from another's params (`train.init_from = DIR`) also `init_from.json`, and one that trains on
`lm data prepare`'s output `prepared_data.json` (`lm.data.sources.prepared_record`). Everything here
checks before anything is written: a run refuses to start, in one line, rather than damage a workdir.

A LoRA run (`model.lora_rank` > 0) starts from a base run (`train.init_from = DIR`) and its checkpoints
leave the base weights out (`lm.state.Setup.saved`): each one's meta holds `lora_base`, the base run's
path, step and the fingerprint of the weights taken from it, and every restore of the run (a resume, a
branch, `load_params`) loads them from there again, or stops in one line if they are gone or changed.
"""

import dataclasses
import functools
import json
import shutil
import sys

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from flax import traverse_util

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import distributed, environment, lora, objectives, partitioning, state
from lm import metrics as metrics_lib
from lm import model as model_lib
from lm import tokenizer as tokenizer_lib
from lm.data import corpus_builder, sources
from lm.errors import UserError


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
  if cfg.train.init_from and _same_directory(config_lib.init_from(cfg)[0], workdir):
    raise UserError(f"train.init_from names the run's own workdir {workdir}")
  if cfg.model.lora_rank and not cfg.train.init_from:
    raise UserError("model.lora_rank > 0 trains adapters on a base run's weights: set train.init_from to that run")
  return path


def _same_directory(a: str, b: str) -> bool:
  return epath.Path(a).absolute() == epath.Path(b).absolute()


def resolve_shards(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`cfg` with `data.shards` fixed: the run's own if it has started before, else the process count.

  A run keeps its shard count for life, so its batches do not depend on how many processes
  resume it; runs from before sharded reading read one shard. A branch (DIR/checkpoints/STEP)
  reads its data as its source run did.
  """
  if cfg.data.shards:
    return cfg
  cfg = config_lib.from_json(config_lib.to_json(cfg))  # a copy
  saved = epath.Path(workdir) / "config.json"
  source, step = config_lib.init_from(cfg)
  if not saved.exists() and step is not None:
    saved = epath.Path(source) / "config.json"
  try:
    previous = json.loads(saved.read_text()) if saved.exists() else None
  except (OSError, ValueError):
    previous = None  # check_workdir reports an unreadable config
  if previous is None:
    cfg.data.shards = jax.process_count()
  else:
    cfg.data.shards = previous.get("data", {}).get("shards") or 1
  return cfg


def load_or_train_tokenizer(cfg, workdir: epath.Path) -> tokenizer_lib.Tokenizer:
  """The workdir's tokenizer, else that of the run `train.init_from` names (DIR or DIR/checkpoints/STEP), else
  the one in `tokenizer.path`, else a new one (`train_new_tokenizer`); checked against the config. A new or
  copied one is saved by `write_workdir`.

  The model's vocabulary is the tokenizer's `loaded_vocab_size`: its size as the workdir saved it, so a
  run from before a special token was added (`tok.added`) keeps its model's shapes. A copied tokenizer is
  the new run's own, specials included.
  """
  if (workdir / "tokenizer.json").exists():
    return _checked_tokenizer(cfg, workdir)
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    raise UserError(f"{workdir} has checkpoints but its tokenizer is missing (tokenizer.json)")
  if cfg.train.init_from:  # token ids must mean what they meant to the source's params (a run or a branch)
    source = config_lib.init_from(cfg)[0]
    if cfg.tokenizer.path:
      raise UserError("set tokenizer.path or train.init_from, not both: a run from another's params uses its tokenizer")
    check_run(source, "train.init_from")
    return tokenizer_lib.Tokenizer.from_bytes(_checked_tokenizer(cfg, epath.Path(source)).to_bytes())
  if cfg.tokenizer.path:
    try:
      return tokenizer_lib.Tokenizer.from_bytes(_checked_tokenizer(cfg, epath.Path(cfg.tokenizer.path)).to_bytes())
    except UserError as e:
      raise UserError(f"tokenizer.path: {e}") from None
  if cfg.tokenizer.kind == "huggingface":
    raise UserError(
      "a huggingface tokenizer comes with an imported checkpoint (lm import hf): set train.init_from to that run"
    )
  return train_new_tokenizer(cfg)[0]


def train_new_tokenizer(cfg) -> tuple[tokenizer_lib.Tokenizer, int]:
  """A tokenizer of `cfg.tokenizer`, trained as a new run trains its own: on up to `tokenizer.train_bytes` of the
  train split of `data.source`, spread over it (`corpus_builder.training_text`). `lm tokenizer train` and
  `lm tokenizer stats` train theirs here too. Also returns the bytes of text read for it, at most train_bytes
  (0 for the byte kind, which learns nothing)."""
  read = 0

  def counted(texts):
    nonlocal read
    for text in texts:
      read += len(text.encode())
      yield text

  tok = tokenizer_lib.train_tokenizer(cfg, counted(corpus_builder.training_text(cfg, cfg.tokenizer.train_bytes)))
  return tok, min(read, cfg.tokenizer.train_bytes)


def _checked_tokenizer(cfg, directory: epath.Path) -> tokenizer_lib.Tokenizer:
  try:
    tok = tokenizer_lib.load_tokenizer(directory)
  except (ValueError, KeyError, RuntimeError, OSError) as e:
    raise UserError(f"cannot read the tokenizer in {directory}: {type(e).__name__}: {e}") from None
  t = cfg.tokenizer
  if tok.kind != t.kind or (t.kind != "byte" and tok.vocab_size != t.vocab_size):
    wanted = "byte tokenizer" if t.kind == "byte" else f"{t.kind} tokenizer of {t.vocab_size} tokens"
    raise UserError(f"{directory} holds a {tok.kind} tokenizer of {tok.vocab_size} tokens, not the configured {wanted}")
  return tok


def check_run(directory: str, what: str) -> None:
  """Raises UserError unless `directory` holds a run (its config and tokenizer)."""
  path = epath.Path(directory)
  for name in ("config.json", "tokenizer.json"):
    if not (path / name).exists():
      raise UserError(f"{what}: {directory} is not a run directory (no {name})")


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
  saved_tok = tokenizer_lib.Tokenizer.from_bytes(checkpoint_lib.decode_blob(meta["tokenizer"]))
  if saved_tok.to_bytes() != tok.to_bytes():  # both with the specials added since, if it predates them
    raise UserError(f"{where} was trained with a different tokenizer than the one in {directory}")
  if cfg.model.lora_rank and not isinstance(meta.get("lora_base"), dict):
    raise UserError(f"{where} holds LoRA adapters but no pointer to their base run (lora_base)")


def checkpoint_meta(cfg, tok: tokenizer_lib.Tokenizer) -> dict:
  """The `meta` item every checkpoint of a run holds: its config, tokenizer and library versions."""
  return {
    "config": cfg.to_dict(),
    "tokenizer": checkpoint_lib.encode_blob(tok.to_bytes()),
    "versions": environment.versions(),
  }


def _restore_run(workdir: str, tok, setup: state.Setup, check_meta, only_step: int | None = None):
  """`checkpoint.restore_latest` of the run in `workdir` onto `setup`; a LoRA model's base weights, which its
  checkpoints leave out, are loaded back from the base run its meta names (`load_base`). Called outside
  `setup.context()`: setting up the base run's model there would apply its sharding rules to abstract values."""
  with setup.context():
    restored = checkpoint_lib.restore_latest(workdir, setup.saved(setup.abstract_state), check_meta, only_step)
  if restored is None or not setup.model_cfg.lora_rank:
    return restored
  base = load_base(restored.meta["lora_base"], tok, setup)
  params = jax.device_put(lora.combine(restored.state.params, base), setup.state_shardings.params)
  return dataclasses.replace(restored, state=restored.state.replace(params=params))


def load_base(pointer: dict, tok: tokenizer_lib.Tokenizer, setup: state.Setup) -> dict:
  """The base weights of a LoRA model of `setup` (tokenizer `tok`): those of checkpoint `pointer["step"]` of
  the run `pointer["run"]`, taken as `start_params` took them. UserError if that run or checkpoint is gone,
  or if they differ from the ones the adapters were trained on (`pointer["fingerprint"]`)."""
  source, step = pointer["run"], pointer["step"]
  if not (epath.Path(source) / "config.json").exists():
    raise UserError(f"the base run {source} of this LoRA run is gone: its checkpoint {step} holds the base weights")
  params, _ = _params_from(source, step, tok, setup, "this LoRA run's base run")
  base = lora.partition(params)[1]
  if checkpoint_lib.fingerprint(base) != pointer["fingerprint"]:
    raise UserError(f"checkpoint {step} of the base run {source} holds other weights than this LoRA run adapts")
  return base


def restore(cfg, tok: tokenizer_lib.Tokenizer, setup: state.Setup, workdir: str) -> checkpoint_lib.Restored | None:
  """The state to resume: the workdir's newest checkpoint that restores, else the one a branch starts from
  (`train.init_from = DIR/checkpoints/STEP`), else None. Writes nothing."""
  restored = _restore_run(workdir, tok, setup, functools.partial(check_checkpoint, cfg, tok, workdir))
  if restored is None and config_lib.init_from(cfg)[1] is not None:
    restored = restore_branch_source(cfg, tok, setup)
  return restored


def restore_branch_source(cfg, tok: tokenizer_lib.Tokenizer, setup: state.Setup) -> checkpoint_lib.Restored:
  """The state and data position saved in `train.init_from` (WORKDIR/checkpoints/STEP), for a run that branches there.

  The checkpoint must be the newest of its run, and its config one that this config could resume: typically
  the branch differs in `train.steps` only, so that a WSD schedule cools down from STEP (Hägele et al. 2024).
  """
  workdir, step = config_lib.init_from(cfg)

  def check(found: int, meta: dict) -> None:
    if found != step:
      raise UserError(f"train.init_from names checkpoint {step}, but the newest checkpoint of {workdir} is {found}")
    check_checkpoint(cfg, tok, workdir, found, meta)

  restored = _restore_run(workdir, tok, setup, check)
  if restored is None:
    raise UserError(f"train.init_from: {workdir} has no checkpoints")
  return dataclasses.replace(restored, damaged=[])  # damage in the source run is not this run's to clean up


@dataclasses.dataclass
class Start:
  """The params a run starts from (`train.init_from = DIR`) and the record of where they came from."""

  params: dict  # a nested dict of arrays, laid out as the new run's params are
  record: dict  # {"run", "step", "config", "fresh_params"}: written to init_from.json and every checkpoint
  lora_base: dict | None = None  # a LoRA run's {"run", "step", "fingerprint"} of its base weights: in every checkpoint


def start_params(cfg, tok: tokenizer_lib.Tokenizer, setup: state.Setup) -> Start | None:
  """The params of the newest good checkpoint of the run `train.init_from = DIR` names, for a new run.

  The model's params come from the source as `lm.model.trunk_params` says: the same shapes, and only a
  scalar head or LoRA adapters may be new (an LM head the model lacks is dropped). Params the objective
  adds beyond the model's keep their fresh initialisation. New ones are named in the record. None without
  `train.init_from` or for a branch. Writes nothing; damaged checkpoints of the source are skipped. A LoRA
  model gets the pointer to its base weights (`Start.lora_base`), which its checkpoints leave out.
  """
  source, step = config_lib.init_from(cfg)
  if not cfg.train.init_from or step is not None:
    return None
  params, record = _params_from(source, None, tok, setup, "train.init_from")
  if not setup.model_cfg.lora_rank:
    return Start(params, record)
  trained = traverse_util.flatten_dict(lora.partition(setup.abstract_state.params)[0], sep="/")
  untrained = [k for k in record["fresh_params"] if k not in trained]
  if untrained:
    raise UserError(
      f"train.init_from: a LoRA run trains only adapters and a scalar head, and {', '.join(untrained)} "
      f"would stay at its initial value (not in {source})"
    )
  fingerprint = checkpoint_lib.fingerprint(lora.partition(params)[1])
  return Start(params, record, {"run": record["run"], "step": record["step"], "fingerprint": fingerprint})


def _params_from(source: str, step: int | None, tok, setup: state.Setup, what: str) -> tuple[dict, dict]:
  """(params, record): the params of checkpoint `step` (None: the newest good one) of the run in `source`, as a
  model of `setup` with tokenizer `tok` starts from them (`start_params`), and the record of where they came
  from. Errors are one line starting with `what`."""
  check_run(source, what)
  source_cfg, source_tok = load_run(source)
  if source_tok.to_bytes() != tok.to_bytes():
    raise UserError(f"{what}: {source} has another tokenizer than this run's")
  if setup.model_cfg.head == "lm" and source_cfg.model.tie_embeddings != setup.cfg.model.tie_embeddings:
    raise UserError(
      f"{what}: the model of {source} differs from this run's: model.tie_embeddings is "
      f"{source_cfg.model.tie_embeddings} there, {setup.cfg.model.tie_embeddings} here"
    )
  source_setup = state.build(source_cfg, source_tok.loaded_vocab_size, setup.mesh)
  # The model's own params, without any the objective adds (the base class's init is the model's).
  init = functools.partial(objectives.Objective.init_params, setup.objective, setup.model)
  model_shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))

  def starting(params):  # rows for the specials added to the tokenizer since the source was saved, then the trunk
    grown = tokenizer_lib.grow_vocab(params, source_tok.loaded_vocab_size, tok.loaded_vocab_size)
    return model_lib.trunk_params(model_shapes, grown)

  try:
    taken = jax.eval_shape(starting, source_setup.abstract_state.params)
  except ValueError as e:
    raise UserError(f"{what}: the params of {source} do not fit this run's model: {e}") from None
  try:
    restored = restore_newest(source, source_cfg, source_tok, source_setup, step)
  except UserError as e:
    raise UserError(f"{what}: {e}") from None
  flat_taken = traverse_util.flatten_dict(taken, sep="/")
  record = {
    "run": str(epath.Path(source).absolute()),
    "step": restored.step,
    "config": source_cfg.to_dict(),
    "fresh_params": sorted(
      k for k in traverse_util.flatten_dict(setup.abstract_state.params, sep="/") if k not in flat_taken
    ),
  }
  return starting(restored.state.params), record


def restore_newest(
  workdir: str, cfg, tok: tokenizer_lib.Tokenizer, setup: state.Setup, only_step: int | None = None
) -> checkpoint_lib.Restored:
  """The newest checkpoint (or checkpoint `only_step`) of the run in `workdir` that restores onto `setup`;
  damaged newer ones are skipped with a warning and left where they are. Raises UserError if there is none."""
  check = functools.partial(check_checkpoint, cfg, tok, workdir)
  restored = _restore_run(workdir, tok, setup, check, only_step)
  if restored is None:
    missing = "to load" if only_step is None else str(only_step)
    raise UserError(f"{workdir} has no checkpoint {missing}")
  if distributed.is_lead():
    for step, reason in restored.damaged:
      print(
        f"lm: warning: checkpoint {step} of {workdir} is damaged ({reason}); using {restored.step}", file=sys.stderr
      )
  return restored


def check_free_space(cfg, path: epath.Path, abstract_state) -> None:
  """Refuses to start when the workdir's filesystem has less than `train.min_free_bytes` free.

  The default (-1) asks for room for two checkpoints: twice the bytes of `abstract_state`, what one holds.
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


def write_workdir(cfg, path: epath.Path, tok: tokenizer_lib.Tokenizer, init_record: dict | None = None) -> None:
  """Creates `path` and writes `config.json`, `environment.json`, the tokenizer and, for a run that starts
  from another's params, `init_from.json`: the run's first writes."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    if distributed.is_lead():
      metrics_lib.replace_text(path / "config.json", config_lib.to_json(cfg))
      metrics_lib.replace_text(path / "environment.json", json.dumps(environment.versions(), indent=2) + "\n")
      if init_record is not None:
        metrics_lib.replace_text(path / "init_from.json", json.dumps(init_record, indent=2) + "\n")
      prepared = sources.prepared_record(cfg.data.source) if cfg.data.source.startswith("jsonl:") else None
      if prepared is not None:  # the run trains on `lm data prepare`'s output: say which, and how it was made
        metrics_lib.replace_text(path / "prepared_data.json", json.dumps(prepared, indent=2) + "\n")
      if not (path / "tokenizer.json").exists():
        staging = path / "tokenizer.tmp"
        tok.save(staging)
        for name in (*tokenizer_lib.MODEL_FILES.values(), "tokenizer.json"):  # the json last: it marks it complete
          if (staging / name).exists():
            (staging / name).replace(path / name)
        staging.rmdir()
  except OSError as e:
    raise UserError(f"cannot write to workdir {path}: {e.strerror or e}") from None


def read_init_record(path: epath.Path) -> dict | None:
  """Where the run in `path` took its first params from (`init_from.json`), if it started from another run's."""
  record = path / "init_from.json"
  return json.loads(record.read_text()) if record.exists() else None


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, tokenizer_lib.Tokenizer]:
  """The config and tokenizer a workdir was trained with."""
  path = epath.Path(workdir)
  if not (path / "config.json").exists():
    raise UserError(f"{workdir} is not a run directory (no config.json)")
  return config_lib.from_json((path / "config.json").read_text()), tokenizer_lib.load_tokenizer(path)


def load_params(
  workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, tokenizer_lib.Tokenizer, state.Setup, dict]:
  """(config, tokenizer, Setup, params) of the newest checkpoint in `workdir` that restores (or of checkpoint
  `step`); writes nothing.

  The run's mesh and sharding rules are kept when the devices fit them; otherwise the params are
  laid out data-parallel over the devices present. Damaged newer checkpoints are skipped, with a warning.
  A LoRA run's params hold its base weights and adapters, as its model reads them.
  """
  cfg, tok, setup, restored = load_checkpoint(workdir, step)
  return cfg, tok, setup, restored.state.params


def load_checkpoint(
  workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, tokenizer_lib.Tokenizer, state.Setup, checkpoint_lib.Restored]:
  """(config, tokenizer, Setup, the newest checkpoint that restores, or checkpoint `step`) of the run in
  `workdir`, as `load_params`."""
  cfg, tok = load_run(workdir)
  try:
    config_lib.mesh_shape(cfg, jax.device_count())
  except UserError:
    cfg.mesh.data, cfg.mesh.expert, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1, 1
  setup = state.build(cfg, tok.loaded_vocab_size, partitioning.make_mesh(cfg))
  return cfg, tok, setup, restore_newest(workdir, cfg, tok, setup, step)
