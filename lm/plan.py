"""`lm plan`: compile the real train step for a TPU slice ahead of time, on a machine without TPUs.

lm plan --config FILE --topology v5p:2x2x4 [--json] [--config.KEY=VALUE ...]

libtpu's compiler builds the step `lm train` would run (`lm.step.make_train_step`: same mesh,
shardings and donation) for the devices of a named topology, as MaxText's train_compile.py does.
Nothing is trained, no tokenizer is trained and no data is read. Reported per device (a chip; a
TensorCore on v3, whose two cores are two JAX devices):
- memory: parameters and optimizer state (their shards in the configured layout), the activations,
  gradients and other temporaries live at the step's peak, and the rest (batch, counters, code).
  The total is the compiler's peak of live HBM, the figure its own out-of-memory check uses (XLA's
  temp allocation, also reported, can exceed it: buffers never live together share HBM);
- compute: the compiled FLOPs of one step per device and for the slice, next to the model's FLOPs
  under `train.flops_convention` (`lm.flops`);
- XLA's cost-model step time (`optimal_seconds`) and the MFU and tokens/s it implies for the slice;
- the chip-hours of the configured run: train.steps, capped by train.max_tokens / max_flops as
  `lm train` caps it.
Memory comes from the step as `lm train` compiles it. XLA's cost analysis, though, counts a while
loop's body once (scanned layers, gradient accumulation, fsdp's windowed einsums) and cannot
price libtpu's sliced prefetch; when the step has any of these, its FLOPs and time come from
compiles without them (`COST_OPTIONS`): of the step itself if its layers are unscanned and it
has no accumulation, else of 1 and 2 unscanned layers on one microbatch, extrapolated to
model.n_layers and multiplied by optim.grad_accum_steps. A config whose state alone exceeds HBM
is not compiled. One that does not fit gets its report printed, then a UserError.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys

import ml_collections

from lm import config as config_lib
from lm.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation as JAX sees it."""

  dims: int  # the topology's dimensions: AxB or AxBxC chips
  hbm_bytes: int  # per JAX device
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  devices_per_chip: int = 1
  megacore: bool = False  # the chip's two TensorCores run as one device


# From cloud.google.com/tpu/docs/{v3,v4,v5e,v5p,v6e}; the peaks are those of lm.flops.TPU_PEAK_FLOPS.
CHIPS = {
  "v3": Chip(dims=2, hbm_bytes=16 * GiB, peak_flops=123e12, hbm_bandwidth=900e9, devices_per_chip=2),
  "v4": Chip(dims=3, hbm_bytes=32 * GiB, peak_flops=275e12, hbm_bandwidth=1228e9, megacore=True),
  "v5e": Chip(dims=2, hbm_bytes=16 * GiB, peak_flops=197e12, hbm_bandwidth=819e9),
  "v5p": Chip(dims=3, hbm_bytes=95 * GiB, peak_flops=459e12, hbm_bandwidth=2765e9, megacore=True),
  "v6e": Chip(dims=2, hbm_bytes=32 * GiB, peak_flops=918e12, hbm_bandwidth=1640e9),
}
TOPOLOGY_EXAMPLES = "v5e:2x4 (v5e-8), v5p:2x2x4 (v5p-32), v6e:4x4 (v6e-16), v4:2x2x2 (v4-16), v3:4x4 (v3-32)"

# XLA's cost model counts a while loop's body once and cannot price libtpu's async sliced prefetch (it returns a
# negative time). Costs come from programs compiled without either: layers unscanned, one microbatch, and these
# options, which turn windowed einsums (fsdp's collective matmuls) back into all-gather + matmul.
COST_OPTIONS = {
  "xla_tpu_enable_windowed_einsum_for_all_gather": False,
  "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
  "xla_tpu_sliced_prefetch_max_slices": 0,
}

# Keys that change neither the shapes nor the cost of the compiled step: points of a sweep that differ
# only in these (steps, budget, lr schedule) share one compile. train.batch_size, train.objective and
# data.seq_len do count.
PROGRAM_KEYS = ("train.batch_size", "train.objective", "data.seq_len")
RUN_ONLY_KEYS = (
  "train.",
  "data.",
  "tokenizer.train_bytes",
  "tokenizer.path",
  "optim.lr",
  "optim.final_lr_fraction",
  "optim.warmup_steps",
  "optim.schedule",
  "optim.cooldown_",
)


def add_parser(subparsers) -> None:
  """Adds the `plan` subcommand to an argparse subparsers object."""
  p = subparsers.add_parser("plan", help="compile the train step for a TPU slice: memory, step time, MFU, chip-hours")
  p.add_argument("--config", required=True, help="experiment file defining get_config()")
  p.add_argument("--topology", required=True, help=f"TPU slice as GENERATION:CHIPS, e.g. {TOPOLOGY_EXAMPLES}")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
  from lm import plan_search  # noqa: PLC0415

  plan_search.add_arguments(p)


def run(args, overrides: list[str]) -> int:
  """Plans `args.config` on `args.topology` and prints the report; raises UserError if it does not fit."""
  cfg = config_lib.load_config(args.config, overrides)
  if args.search:
    from lm import plan_search  # noqa: PLC0415

    return plan_search.run(args, cfg)
  planner = Planner(args.topology, log=lambda text: print(f"lm plan: {text}", file=sys.stderr))
  report = planner.plan(cfg)
  print(json.dumps(report) if args.json else format_report(report, args.config))
  if not report["fits"]:
    raise UserError(f"{args.config} {not_fit_summary(report)}")
  return 0


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """(generation, chips per dimension) of a topology name such as `v5p:2x2x4`."""
  match = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name)
  generation = match[1] if match else ""
  dims = tuple(int(d) for d in match[2].split("x")) if match else ()
  if generation not in CHIPS or len(dims) != CHIPS[generation].dims or min(dims) < 1:
    raise UserError(
      f"unknown TPU topology {name!r}: use GENERATION:CHIPS ({', '.join(CHIPS)}), e.g. {TOPOLOGY_EXAMPLES}"
    )
  return generation, dims


@functools.cache
def topology_devices(name: str) -> tuple:
  """libtpu's compile-only devices of a topology; UserError if libtpu is missing or rejects the name."""
  generation, dims = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise UserError("lm plan compiles with libtpu, which is not installed (pip install libtpu)")
  import jax  # noqa: PLC0415 (keeps `lm --help` fast)
  from jax.experimental import topologies  # noqa: PLC0415

  chip, dims3 = CHIPS[generation], dims + (1,) * (3 - len(dims))
  # Torus links close over whole 4x4x4 cubes of 3D slices and over 16-chip rows of 2D ones.
  wrap = (all(d % 4 == 0 for d in dims),) * 3 if chip.dims == 3 else (dims[0] == 16, dims[1] == 16, False)
  options = {
    "chip_config_name": "megacore" if chip.megacore else "default",
    "chips_per_host_bounds": tuple(min(d, h) for d, h in zip(dims3, (2, 2, 1), strict=True)),
    "wrap": wrap,
  }
  try:
    with _libtpu_environment():
      return tuple(topologies.get_topology_desc(name, "tpu", **options).devices)
  except jax.errors.JaxRuntimeError as e:  # libtpu's INVALID_ARGUMENT for a shape it does not build
    raise UserError(f"TPU topology {name!r}: {str(e).splitlines()[0]}; e.g. {TOPOLOGY_EXAMPLES}") from None


@contextlib.contextmanager
def _libtpu_environment():
  """On a machine without TPUs (lm/__init__ set JAX_PLATFORMS=cpu), tells libtpu's start-up that the host is
  one worker, so that it prints no warnings, and lets it skip /tmp/libtpu_lockfile, so that concurrent plans
  (or a plan next to another libtpu user) do not fail."""
  added = {}
  if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):
    wanted = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
  os.environ.update(added)
  try:
    yield
  finally:
    for key in added:
      del os.environ[key]


def program_key(cfg: ml_collections.ConfigDict) -> str:
  """The config values that determine the compiled train step (everything but `RUN_ONLY_KEYS`)."""
  flat = config_lib.flatten(cfg.to_dict())
  kept = {k: v for k, v in flat.items() if k in PROGRAM_KEYS or not k.startswith(RUN_ONLY_KEYS)}
  return json.dumps(kept, sort_keys=True, default=str)


def planned_steps(cfg: ml_collections.ConfigDict) -> int:
  """The steps `lm train` runs: the run's length (`lm.optim.run_steps`), or fewer with train.stop_at_step."""
  from lm import optim  # noqa: PLC0415
  from lm.model import ModelConfig  # noqa: PLC0415
  from lm.scaling import accounting  # noqa: PLC0415

  steps = optim.run_steps(cfg, ModelConfig.from_config(cfg, accounting.vocab_size(cfg)))
  return min(steps, cfg.train.stop_at_step) if cfg.train.stop_at_step else steps


@dataclasses.dataclass
class _Compiled:
  """What compiling one program told: memory per device and XLA's cost, or the compiler's OOM message."""

  memory: object = None  # jax's CompiledMemoryStats
  flops: float = 0.0  # per device
  seconds: float = 0.0
  priceable: bool = False  # XLA's cost model counted all of it: no while loop, and a positive time
  out_of_memory: str = ""


class Planner:
  """Plans configs on one topology, compiling each distinct train-step program once."""

  def __init__(self, topology: str, log=None):
    self.topology = topology
    self.generation, _ = parse_topology(topology)
    self.chip = CHIPS[self.generation]
    self.devices = topology_devices(topology)
    self.log = log or (lambda text: None)
    self._compiled: dict[str, _Compiled] = {}
    self._programs: dict[str, dict] = {}

  @property
  def compiles(self) -> int:
    """How many programs were compiled so far."""
    return len(self._compiled)

  def plan(self, cfg: ml_collections.ConfigDict) -> dict:
    """The report of `cfg` on this topology, JSON-serialisable (see `format_report`)."""
    from lm import flops  # noqa: PLC0415
    from lm.model import ModelConfig  # noqa: PLC0415
    from lm.scaling import accounting  # noqa: PLC0415

    program = self.program(cfg)
    acc = accounting.accounting(cfg)
    flops_per_token = acc["flops_per_token"][cfg.train.flops_convention]
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    steps = planned_steps(cfg)
    chips = len(self.devices) // self.chip.devices_per_chip
    step_s = program["step_s"]
    model_flops = flops_per_token * tokens_per_step
    mesh_sizes = dict(zip(config_lib.MESH_AXES, config_lib.mesh_shape(cfg, len(self.devices)), strict=True))
    return {
      "topology": self.topology,
      "generation": self.generation,
      "chips": chips,
      "devices": len(self.devices),
      "device": "core" if self.chip.devices_per_chip > 1 else "chip",
      "mesh": mesh_sizes,
      "params": acc["params"],
      "trainable_params": flops.trainable_params(ModelConfig.from_config(cfg, accounting.vocab_size(cfg))),
      "batch_size": cfg.train.batch_size,
      "seq_len": cfg.data.seq_len,
      **{k: v for k, v in program.items() if k != "step_s"},
      "flops_convention": cfg.train.flops_convention,
      "model_flops_per_step": model_flops,
      "step_s": step_s,
      "tokens_per_s": tokens_per_step / step_s if step_s else None,
      "mfu": model_flops / (step_s * chips * self.chip.peak_flops) if step_s else None,
      "steps": steps,
      "tokens": steps * tokens_per_step,
      "hours": steps * step_s / 3600 if step_s else None,
      "chip_hours": steps * step_s * chips / 3600 if step_s else None,
    }

  def program(self, cfg: ml_collections.ConfigDict) -> dict:
    """The part of `cfg`'s report its compiled program decides (memory, fit, cost), compiled once."""
    config_lib.validate(cfg, len(self.devices))
    key = program_key(cfg)
    if key not in self._programs:
      self._programs[key] = self._program(cfg)
    return self._programs[key]

  def set_program(self, cfg: ml_collections.ConfigDict, program: dict) -> None:
    """Plans of `cfg`'s program use `program` (compiled elsewhere, or cached) instead of compiling it."""
    self._programs[program_key(cfg)] = program

  def _program(self, cfg: ml_collections.ConfigDict) -> dict:
    """Memory per device and cost of one step of `cfg`'s program; the part of a report points can share."""
    import jax  # noqa: PLC0415

    from lm import partitioning, state  # noqa: PLC0415
    from lm.scaling import accounting  # noqa: PLC0415

    mesh = partitioning.make_mesh(cfg, devices=self.devices)
    setup = state.build(cfg, accounting.vocab_size(cfg), mesh)
    batch = abstract_batch(cfg, mesh)
    leaves = jax.tree_util.tree_flatten_with_path(setup.abstract_state)[0]
    buffers = sorted(
      ((jax.tree_util.keystr(path, simple=True, separator="/"), shard_bytes(x)) for path, x in leaves),
      key=lambda item: -item[1],
    )
    state_bytes = sum(nbytes for _, nbytes in buffers) + sum(shard_bytes(x) for x in batch.values())
    memory = {
      "params": sum(shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state.params)),
      "optimizer": sum(shard_bytes(x) for x in jax.tree.leaves(setup.abstract_state.opt_state)),
      "temporaries": None,
      "other": None,
      "total": None,
      "hbm": self.chip.hbm_bytes,
      "temp_allocation": None,
    }
    program = {
      "memory_per_device": memory,
      "fits": False,
      "does_not_fit": "",
      "largest_buffers": [{"path": path, "bytes": nbytes} for path, nbytes in buffers[:5]],
      "flops_per_device": None,
      "flops_per_step": None,
      "cost_from": None,
      "step_s": None,
      "attention": setup.model_cfg.attention,
      "kernel_cost": None,
      "compiled": False,  # the state alone fits HBM, so the step went to the compiler
    }
    if state_bytes > self.chip.hbm_bytes:
      program["does_not_fit"] = f"the train state and batch alone need {_size(state_bytes)} (not compiled)"
      return program
    compiled = self._compile(cfg, setup=setup, batch=batch)
    program["compiled"] = True
    if compiled.out_of_memory:
      program["does_not_fit"] = f"the compiler ran out of HBM: {compiled.out_of_memory}"
      memory["total"] = _required_from(compiled.out_of_memory)
      if memory["total"] is not None:
        memory["temporaries"] = memory["total"] - state_bytes
      return program
    m = compiled.memory
    arguments = m.argument_size_in_bytes
    peak = m.peak_memory_in_bytes or arguments + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    memory["temporaries"] = max(peak - arguments, 0)
    memory["other"] = arguments - memory["params"] - memory["optimizer"] + m.generated_code_size_in_bytes
    memory["total"] = max(peak, arguments) + m.generated_code_size_in_bytes
    memory["temp_allocation"] = m.temp_size_in_bytes
    program["fits"] = memory["total"] <= self.chip.hbm_bytes
    if not program["fits"]:
      program["does_not_fit"] = "the compiled step's peak exceeds HBM"
      return program
    flops, seconds, program["cost_from"] = self._cost(cfg, compiled)
    if setup.model_cfg.attention == "splash":
      kernel = program["kernel_cost"] = self._splash_cost(cfg, setup)
      flops += kernel["flops_per_device"]
      seconds = seconds and seconds + kernel["seconds"]
      program["cost_from"] += "; splash attention's kernels by formula (XLA's cost model does not see inside them)"
    program.update(flops_per_device=flops, flops_per_step=flops * len(self.devices), step_s=seconds)
    return program

  def _splash_cost(self, cfg: ml_collections.ConfigDict, setup) -> dict:
    """FLOPs and seconds per device of one step's splash kernels (`lm.kernels.attention_cost`): every layer,
    every microbatch, the forward twice under remat; each kernel at the slower of the chip's peak FLOP/s and
    its HBM bandwidth."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415

    from lm import kernels  # noqa: PLC0415

    m, mesh = setup.model_cfg, setup.mesh
    with nn.logical_axis_rules(setup.rules):
      batch_axes, head_axes = kernels.splash_partition(mesh, m.n_heads, m.n_kv_heads)
    rows = cfg.train.batch_size // cfg.optim.grad_accum_steps // kernels.shards(mesh, batch_axes)
    heads, kv_heads = (n // kernels.shards(mesh, head_axes) for n in (m.n_heads, m.n_kv_heads))
    itemsize = jax.numpy.dtype(m.dtype).itemsize
    cost = kernels.attention_cost(rows, heads, kv_heads, cfg.data.seq_len, m.head_dim, itemsize)
    peak, bandwidth = (x / self.chip.devices_per_chip for x in (self.chip.peak_flops, self.chip.hbm_bandwidth))
    forwards = 2 if m.remat != "none" else 1
    calls = m.n_layers * cfg.optim.grad_accum_steps
    flops = calls * (forwards * cost["forward_flops"] + cost["backward_flops"])
    seconds = calls * (
      forwards * max(cost["forward_flops"] / peak, cost["forward_bytes"] / bandwidth)
      + max(cost["backward_flops"] / peak, cost["backward_bytes"] / bandwidth)
    )
    return {"flops_per_device": flops, "seconds": seconds, "rows_per_device": rows, "heads_per_device": heads}

  def _cost(self, cfg: ml_collections.ConfigDict, compiled: _Compiled) -> tuple[float, float | None, str]:
    """(FLOPs per device, seconds or None) of one step by XLA's cost model, every loop iteration counted."""
    layers, accum = cfg.model.n_layers, cfg.optim.grad_accum_steps
    if compiled.priceable:
      return compiled.flops, compiled.seconds, "the compiled step"
    if not (cfg.model.scan_layers and layers > 1) and accum == 1:
      compiled = self._compile(cfg, for_cost=True)
      seconds = compiled.seconds if compiled.priceable else None
      return compiled.flops, seconds, "the step compiled without collective matmuls"
    one, two = (self._compile(_unrolled(cfg, n), for_cost=True) for n in (1, 2))

    def extrapolate(a: float, b: float) -> float:
      return accum * (a + (layers - 1) * (b - a))

    how = f"unscanned 1- and 2-layer compiles of a {cfg.train.batch_size // accum}-row microbatch, extrapolated"
    seconds = extrapolate(one.seconds, two.seconds) if one.priceable and two.priceable else None
    return extrapolate(one.flops, two.flops), seconds, how

  def _compile(self, cfg: ml_collections.ConfigDict, setup=None, batch=None, for_cost: bool = False) -> _Compiled:
    """Compiles `cfg`'s train step for the topology (once per program); `for_cost`: with `COST_OPTIONS`."""
    import jax  # noqa: PLC0415

    from lm import partitioning, state, step  # noqa: PLC0415
    from lm.scaling import accounting  # noqa: PLC0415

    key = program_key(cfg) + (" for cost" if for_cost else "")
    if key in self._compiled:
      return self._compiled[key]
    if setup is None:
      mesh = partitioning.make_mesh(cfg, devices=self.devices)
      setup, batch = state.build(cfg, accounting.vocab_size(cfg), mesh), abstract_batch(cfg, mesh)
    m = cfg.model
    self.log(
      f"compiling the train step of d_model={m.d_model} n_layers={m.n_layers} scan_layers={m.scan_layers} "
      f"batch {cfg.train.batch_size} x {cfg.data.seq_len} for {self.topology} ({len(self.devices)} devices)"
      + (" (for XLA's cost model)" if for_cost else "")
    )
    with setup.context(), _no_persistent_cache_writes():
      lowered = step.make_train_step(setup).lower(setup.abstract_state, batch)
      try:
        executable = lowered.compile(COST_OPTIONS if for_cost else None)
      except jax.errors.JaxRuntimeError as e:
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
          raise
        result = _Compiled(out_of_memory=str(e).splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ").rstrip("."))
      else:
        cost = executable.cost_analysis()
        result = _Compiled(
          executable.memory_analysis(),
          cost["flops"],
          cost["optimal_seconds"],
          priceable=cost["optimal_seconds"] > 0 and " while(" not in executable.as_text(),
        )
    self._compiled[key] = result
    return result


@contextlib.contextmanager
def _no_persistent_cache_writes():
  """Keeps plan's executables out of JAX's persistent compilation cache: it can store an executable compiled for
  a topology but not load it back without a TPU client (it warns and recompiles)."""
  import jax  # noqa: PLC0415

  saved = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved)


def _required_from(message: str) -> int | None:
  """The HBM libtpu's out-of-memory message says the step needs ("... HLO temporaries (36.08G) exceeds ...")."""
  match = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
  return round(float(match[1]) * 2 ** (10 * "KMGT".index(match[2]) + 10)) if match else None


def _unrolled(cfg: ml_collections.ConfigDict, layers: int) -> ml_collections.ConfigDict:
  """`cfg` with `layers` unscanned layers and one microbatch as the batch: a program without loops."""
  variant = ml_collections.ConfigDict(cfg.to_dict())
  variant.model.scan_layers = False
  variant.model.n_layers = layers
  variant.train.batch_size = cfg.train.batch_size // cfg.optim.grad_accum_steps
  variant.optim.grad_accum_steps = 1
  return variant


def abstract_batch(cfg: ml_collections.ConfigDict, mesh) -> dict:
  """ShapeDtypeStructs of a global batch (the format of `lm.data.pipeline`, and the objective's `row_scalars`),
  sharded as `lm train` feeds it."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from lm import objectives, partitioning  # noqa: PLC0415

  shape, sharding = (cfg.train.batch_size, cfg.data.seq_len), partitioning.batch_sharding(mesh)
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32}
  dtypes["loss_mask"] = jnp.float32
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in dtypes.items()}
  objective = objectives.create(cfg)
  for key in objective.row_scalars:
    batch[key] = jax.ShapeDtypeStruct(shape[:1], jnp.float32, sharding=sharding)
  for key in objective.token_arrays:
    batch[key] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
  return batch


def shard_bytes(x) -> int:
  """Bytes of one device's shard of a ShapeDtypeStruct carrying a sharding."""
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def _size(num_bytes: float | None) -> str:
  if num_bytes is None:
    return "-"
  if num_bytes >= GiB:
    return f"{num_bytes / GiB:.2f} GiB"
  if num_bytes >= 2**20:
    return f"{num_bytes / 2**20:.1f} MiB"
  return f"{num_bytes / 2**10:.1f} KiB"


def not_fit_summary(report: dict) -> str:
  """One line: why a planned config does not fit, naming its largest buffers per device."""
  r, memory = report, report["memory_per_device"]
  per = f"per {r['device']}"
  needs = f"needs {_size(memory['total'])} {per} of {_size(memory['hbm'])} HBM" if memory["total"] else ""
  state = f"parameters {_size(memory['params'])} and optimizer state {_size(memory['optimizer'])} {per}"
  largest = ", ".join(f"{b['path']} {_size(b['bytes'])}" for b in r["largest_buffers"][:3])
  temporaries = f"; temporaries {_size(memory['temporaries'])}" if memory["temporaries"] is not None else ""
  return (
    f"does not fit {r['topology']}: {needs or r['does_not_fit']}; {state}{temporaries}; "
    f"largest buffers {per}: {largest}"
  )


def _number(x: float) -> str:
  return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.3e}"


def format_report(report: dict, name: str = "") -> str:
  """The report as a readable table."""
  r, memory = report, report["memory_per_device"]
  per = f"per {r['device']}"
  counts = r["params"]
  trained = f", {_count(r['trainable_params'])} trained" if r["trainable_params"] != counts["total"] else ""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  active = f"{_count(counts['active'])} active, " if counts.get("active", counts["total"]) != counts["total"] else ""
  lines = [
    f"{name or 'config'} on {r['topology']}: {r['chips']} {r['generation']} chips, {r['devices']} devices, mesh {mesh}",
    f"model: {_count(counts['total'])} parameters ({active}{_count(counts['flop_params'])} in FLOPs{trained}), "
    f"batch {r['batch_size']} x {r['seq_len']} tokens",
    "",
    f"memory {per}",
    f"  parameters          {_size(memory['params']):>12}",
    f"  optimizer state     {_size(memory['optimizer']):>12}",
    f"  temporaries         {_size(memory['temporaries']):>12}   activations, gradients... live at the peak",
    f"  other               {_size(memory['other']):>12}   batch, counters, code",
    f"  total               {_size(memory['total']):>12}   the compiler's peak, of {_size(memory['hbm'])} HBM: "
    + ("fits" if r["fits"] else "DOES NOT FIT"),
  ]
  if memory["temp_allocation"] is not None:
    lines.append(
      f"  (XLA's temp allocation is {_size(memory['temp_allocation'])}: buffers never live together overlap)"
    )
  if r["fits"] and not r["step_s"]:
    lines.append("  XLA's cost model gave no step time for this program: no MFU, tokens/s or chip-hours")
    return "\n".join(lines)
  if not r["fits"]:
    lines.append(f"  {r['does_not_fit']}")
    lines.append(f"  largest buffers {per}:")
    lines += [f"    {b['path']:<48} {_size(b['bytes']):>12}" for b in r["largest_buffers"]]
    return "\n".join(lines)
  ratio = r["flops_per_step"] / r["model_flops_per_step"]
  lines += [
    "",
    "per step (XLA's cost model; " + r["cost_from"] + ")",
    f"  compiled FLOPs      {_number(r['flops_per_device'])} {per}, {_number(r['flops_per_step'])} for the slice "
    f"({ratio:.2f}x the model's {_number(r['model_flops_per_step'])} under {r['flops_convention']})",
    *_kernel_lines(r, per),
    f"  step time           {r['step_s']:.4g} s",
    f"  MFU                 {100 * r['mfu']:.1f}%",
    f"  tokens/s            {r['tokens_per_s']:,.0f} for the slice",
    "",
    f"run: {r['steps']:,} steps, {r['tokens']:.3e} tokens: {_hours(r['hours'])} h on the slice, "
    f"{_hours(r['chip_hours'])} chip-hours",
  ]
  return "\n".join(lines)


def _kernel_lines(report: dict, per: str) -> list[str]:
  kernel = report.get("kernel_cost")
  if not kernel:
    return [f"  attention           {report.get('attention', 'xla')} (inside XLA's cost model)"]
  return [
    f"  attention           splash kernels: {_number(kernel['flops_per_device'])} FLOPs and "
    f"{kernel['seconds']:.4g} s {per}, counted by formula and included above"
  ]


def sweep_table(rows: list[tuple[str, dict]], topology: str, compiles: int) -> str:
  """One line per sweep point (id, report), then the total chip-hours."""
  header = f"{'point':<24} {'params':>9} {'steps':>8} {'memory/device':>14} {'HBM':>9} {'fits':>4} "
  header += f"{'step s':>9} {'MFU':>6} {'chip-h':>10}"
  lines = [header]
  total = 0.0
  for point_id, r in rows:
    memory = r["memory_per_device"]
    known = memory["params"] + memory["optimizer"] + (memory["temporaries"] or 0)
    needs = _size(memory["total"]) if memory["total"] is not None else f">{_size(known)}"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    step_s = f"{r['step_s']:.4g}" if r["step_s"] else "-"
    chip_hours = _hours(r["chip_hours"]) if r["chip_hours"] is not None else "-"
    total += r["chip_hours"] or 0.0
    lines.append(
      f"{point_id:<24} {_count(r['params']['total']):>9} {r['steps']:>8,} {needs:>14} "
      f"{_size(memory['hbm']):>9} {'yes' if r['fits'] else 'NO':>4} {step_s:>9} {mfu:>6} {chip_hours:>10}"
    )
  fitting = sum(r["fits"] for _, r in rows)
  lines.append(
    f"total: {_hours(total)} chip-hours on {topology} for the {fitting} of {len(rows)} points that fit "
    f"(programs compiled: {compiles})"
  )
  return "\n".join(lines)


def _count(n: int) -> str:
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= scale:
      return f"{n / scale:.1f}{suffix}"
  return str(n)


def _hours(hours: float) -> str:
  return f"{hours:,.1f}" if hours >= 10 else f"{hours:.3g}"
