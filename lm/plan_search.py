"""`lm plan --search`: the fastest layout of a config that fits a TPU slice, found by compiling candidates.

lm plan --config FILE --topology v5p:2x2x4 --search [--max-candidates N] [--time-budget S] [--jobs J] [--json]

The knobs users otherwise tune by hand, with the global batch held fixed:
- the mesh split over data, fsdp and tensor (the expert axis stays as configured);
- `model.remat`: none, dots, dots_no_batch, full (in that order they recompute more and hold less);
- `optim.grad_accum_steps`: a smaller per-chip microbatch, accumulated to the same batch;
- `model.scan_layers`: on (one layer compiled, faster compiles) or off.

Each candidate is planned like `lm plan` plans a config (`lm.plan.Planner`): its real step compiled for
the topology, its memory against HBM and XLA's cost-model step time. Candidates go in order of what is
usually fastest (less recomputation, less accumulation, less tensor parallelism, the most fsdp shards
first) and their results prune the rest (`prune`): one that does not fit rules out those that hold more
(fewer fsdp shards, a lighter remat, no more accumulation), one that fits rules out those on its mesh
that recompute or accumulate more (slower by the cost model's count). Compiles run in `--jobs`
processes (by default as many as cores and memory allow, about 4 GiB each) and land in a cache
(`--cache-dir`, by default ~/.cache/lm/plan), keyed by the compiled program, the topology and the
versions of lm, jax and libtpu, so that a rerun compiles only what is new.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import time
from importlib import metadata

import ml_collections

from lm import config as config_lib
from lm import plan as plan_lib
from lm.errors import UserError

REMATS = ("none", "dots", "dots_no_batch", "full")  # most memory and fastest first
KNOBS = ("mesh.data", "mesh.fsdp", "mesh.tensor", "model.remat", "optim.grad_accum_steps", "model.scan_layers")
COMPILE_MEMORY = 4 * 2**30  # host memory one compile process may take


def add_arguments(p) -> None:
  """The search's options of `lm plan`."""
  p.add_argument("--search", action="store_true", help="search mesh, remat, accumulation and scan for the fastest fit")
  p.add_argument("--max-candidates", type=int, default=24, help="with --search: plan at most this many (24)")
  p.add_argument("--time-budget", type=float, default=0, help="with --search: start no compile after S seconds")
  p.add_argument("--jobs", type=int, default=0, help="with --search: compile processes (0: by cores and memory)")
  p.add_argument("--cache-dir", default=None, help="with --search: compiled plans (default ~/.cache/lm/plan)")


@dataclasses.dataclass
class Candidate:
  overrides: dict
  status: str = "pending"  # pending | planned | pruned | cut
  why: str = ""
  report: dict | None = None
  compile_s: float | None = None
  cached: bool = False

  @property
  def remat(self) -> int:
    return REMATS.index(self.overrides["model.remat"])

  @property
  def accum(self) -> int:
    return self.overrides["optim.grad_accum_steps"]

  @property
  def group(self) -> tuple:
    """Candidates the pruning rules compare: same mesh, same scan setting."""
    o = self.overrides
    return o["mesh.data"], o["mesh.fsdp"], o["mesh.tensor"], o["model.scan_layers"]


def candidates(cfg: ml_collections.ConfigDict, devices: int) -> list[Candidate]:
  """Every valid layout of `cfg` on `devices` devices, most promising first."""
  expert = cfg.mesh.expert
  if expert == -1:  # the configured mesh's resolved expert axis
    expert = config_lib.mesh_shape(cfg, devices)[config_lib.MESH_AXES.index("expert")]
  rest = devices // expert
  found = []
  for tensor in _divisors(rest):
    for fsdp in _divisors(rest // tensor):
      data = rest // tensor // fsdp
      parallel = data * expert * fsdp
      for accum in _divisors(cfg.train.batch_size):
        if (cfg.train.batch_size // accum) % parallel:
          continue
        for remat in REMATS:
          for scan in (True, False):
            overrides = {
              **({"mesh.expert": expert} if expert > 1 else {}),
              "mesh.data": data,
              "mesh.fsdp": fsdp,
              "mesh.tensor": tensor,
              "model.remat": remat,
              "optim.grad_accum_steps": accum,
              "model.scan_layers": scan,
            }
            try:
              config_lib.validate(with_overrides(cfg, overrides), devices)
            except UserError:
              continue
            found.append(Candidate(overrides))
  accums = sorted({c.accum for c in found})

  def priority(c: Candidate) -> tuple:
    o = c.overrides
    # Unscanned layouts last: they cost what their scanned twins cost (a scanned step is priced by unscanned
    # compiles) and compile slower, so they matter only where no scanned layout fits.
    return (not o["model.scan_layers"], c.remat + accums.index(c.accum), o["mesh.tensor"], o["mesh.data"])

  found.sort(key=priority)
  # The layout the config asks for goes first, so a search never ends slower than the config it started from.
  configured = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), _resolved_mesh(cfg, devices), strict=True))
  configured.update(
    {
      "model.remat": cfg.model.remat,
      "optim.grad_accum_steps": cfg.optim.grad_accum_steps,
      "model.scan_layers": cfg.model.scan_layers,
    }
  )
  first = [c for c in found if all(c.overrides[k] == v for k, v in configured.items())]
  return first + [c for c in found if all(c is not f for f in first)]


def _resolved_mesh(cfg: ml_collections.ConfigDict, devices: int) -> tuple[int, int, int]:
  """The config's (data, fsdp, tensor), with -1 resolved against `devices`; (0, 0, 0) where it does not divide."""
  try:
    shape = dict(zip(config_lib.MESH_AXES, config_lib.mesh_shape(cfg, devices), strict=True))
  except UserError:
    return 0, 0, 0
  return shape["data"], shape["fsdp"], shape["tensor"]


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def with_overrides(cfg: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  variant = ml_collections.ConfigDict(cfg.to_dict())
  for key, value in overrides.items():
    section, name = key.split(".")
    variant[section][name] = value
  return variant


def prune(pending: list[Candidate], done: Candidate) -> None:
  """Marks the pending candidates that `done`'s result rules out.

  Memory: with the tensor split and scan setting fixed, every data x fsdp split holds the same
  activations per device, and fewer fsdp shards hold more of the state; so a candidate that does not
  fit rules out those with no more fsdp, a lighter remat and no more accumulation. Speed: on the same
  mesh, one that fits rules out those that recompute or accumulate more, and its unscanned twin.
  """
  fits, d = done.report["fits"], done.overrides
  for c in pending:
    if c.status != "pending" or c is done:
      continue
    o = c.overrides
    same_split = (o["mesh.tensor"], o["model.scan_layers"]) == (d["mesh.tensor"], d["model.scan_layers"])
    if not fits and same_split and o["mesh.fsdp"] <= d["mesh.fsdp"] and c.remat <= done.remat and c.accum <= done.accum:
      c.status, c.why = "pruned", f"holds at least what {describe(done)} holds, which does not fit"
    elif fits and c.group == done.group and c.remat >= done.remat and c.accum >= done.accum:
      c.status, c.why = "pruned", f"recomputes or accumulates more than {describe(done)}, which fits"
  if fits and d["model.scan_layers"]:
    # Unscanned, the same layout costs the same (a scanned step is priced by unscanned compiles) and
    # compiles n_layers times the code: worth compiling only where the scanned one does not fit.
    twin = {**d, "model.scan_layers": False}
    for c in pending:
      if c.status == "pending" and c.overrides == twin:
        c.status, c.why = "pruned", "costs what its scanned twin, which fits, does"


def describe(c: Candidate) -> str:
  o = c.overrides
  mesh = f"data {o['mesh.data']} x fsdp {o['mesh.fsdp']} x tensor {o['mesh.tensor']}"
  return f"{mesh}, remat {o['model.remat']}, accumulation {o['optim.grad_accum_steps']}"


class Cache:
  """Compiled programs (`Planner`'s per-program reports) as JSON files, one per program and topology."""

  def __init__(self, directory: str | None):
    default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "lm" / "plan"
    self.dir = pathlib.Path(directory) if directory else default
    self.versions = _versions()

  def key(self, topology: str, cfg: ml_collections.ConfigDict) -> str:
    text = json.dumps([topology, plan_lib.program_key(cfg), self.versions])
    return hashlib.sha256(text.encode()).hexdigest()[:24]

  def get(self, topology: str, cfg) -> dict | None:
    path = self.dir / f"{self.key(topology, cfg)}.json"
    return json.loads(path.read_text()) if path.exists() else None

  def put(self, topology: str, cfg, entry: dict) -> None:
    self.dir.mkdir(parents=True, exist_ok=True)
    path = self.dir / f"{self.key(topology, cfg)}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entry))
    tmp.replace(path)


def _versions() -> dict:
  """What a cached plan depends on besides its config: jax, libtpu and lm's own source (but for this file:
  the search does not change what a compiled program costs)."""
  source = hashlib.sha256()
  for path in sorted(pathlib.Path(__file__).parent.rglob("*.py")):
    if path != pathlib.Path(__file__):
      source.update(path.read_bytes())
  versions = {"lm": source.hexdigest()[:16]}
  for package in ("jax", "jaxlib", "libtpu"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  return versions


def default_jobs() -> int:
  """Compile processes: one per core, as far as the available memory allows (`COMPILE_MEMORY` each)."""
  try:
    with open("/proc/meminfo") as f:
      available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
  except (OSError, StopIteration):
    available = COMPILE_MEMORY
  return max(1, min(os.cpu_count() or 1, available // COMPILE_MEMORY))


_worker_planners: dict = {}


def _compile_program(topology: str, cfg_dict: dict) -> tuple[dict, float]:
  """In a compile process: (the program part of the plan, seconds it took)."""
  planner = _worker_planners.get(topology)
  if planner is None:
    planner = _worker_planners[topology] = plan_lib.Planner(topology)
  started = time.perf_counter()
  program = planner.program(ml_collections.ConfigDict(cfg_dict))
  return program, time.perf_counter() - started


def _start_worker() -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def search(
  cfg: ml_collections.ConfigDict,
  planner: "plan_lib.Planner",
  max_candidates: int = 24,
  time_budget: float = 0,
  jobs: int = 1,
  cache: Cache | None = None,
  log=None,
) -> dict:
  """Plans the candidates of `cfg` on `planner`'s topology; {"candidates": [...], "best": report or None}."""
  log = log or (lambda text: None)
  topology, devices = planner.topology, len(planner.devices)
  found = candidates(cfg, devices)
  if not found:
    raise UserError(f"no layout of this config divides the {devices} devices of {topology}: try plain lm plan")
  log(f"{len(found)} candidate layouts on {topology}; planning at most {max_candidates} in {jobs} process(es)")
  started = time.perf_counter()
  planned = 0
  pool = None
  if jobs > 1:
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker)
  running: dict = {}

  def finish(c: Candidate, program: dict, seconds: float | None) -> None:
    variant = with_overrides(cfg, c.overrides)
    planner.set_program(variant, program)
    c.report, c.status, c.compile_s = planner.plan(variant), "planned", seconds
    prune(found, c)
    fits = "fits" if c.report["fits"] else "does not fit"
    speed = f", {c.report['tokens_per_s']:,.0f} tokens/s" if c.report["tokens_per_s"] else ""
    log(f"{format_overrides(c.overrides)}: {fits}{speed}" + (" (cached)" if c.cached else f" ({seconds:.0f} s)"))

  try:
    for c in found:
      if c.status != "pending":
        continue
      over_budget = time_budget and time.perf_counter() - started > time_budget
      if planned >= max_candidates or over_budget:
        c.status, c.why = "cut", "over --time-budget" if over_budget else "over --max-candidates"
        continue
      planned += 1  # cached or compiled: the same search again compiles nothing
      variant = with_overrides(cfg, c.overrides)
      hit = cache.get(topology, variant) if cache else None
      if hit is not None:
        c.cached = True
        finish(c, hit["program"], hit["compile_s"])
        continue
      if pool is None:
        program, seconds = _compile_program(topology, variant.to_dict())
        _store(cache, topology, variant, program, seconds)
        finish(c, program, seconds)
        continue
      running[pool.submit(_compile_program, topology, variant.to_dict())] = c
      while len(running) >= jobs:
        _collect(running, cfg, cache, topology, finish)
    while running:
      _collect(running, cfg, cache, topology, finish)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  return result(found)


def _collect(running: dict, cfg, cache, topology, finish) -> None:
  """Waits for a compile process to finish one; a candidate pruned meanwhile is still reported."""
  done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
  for future in done:
    c = running.pop(future)
    program, seconds = future.result()
    _store(cache, topology, with_overrides(cfg, c.overrides), program, seconds)
    finish(c, program, seconds)


def _store(cache: Cache | None, topology, variant, program: dict, seconds: float) -> None:
  if cache is not None:
    cache.put(topology, variant, {"program": program, "compile_s": seconds})


def result(found: list[Candidate]) -> dict:
  """The JSON of a search: candidates fastest first (fitting ones), then the rest; the best's full report."""
  planned = [c for c in found if c.status == "planned"]
  fitting = sorted((c for c in planned if c.report["fits"]), key=lambda c: -(c.report["tokens_per_s"] or 0))
  rest = [c for c in planned if not c.report["fits"]]
  best = fitting[0].report if fitting and fitting[0].report["tokens_per_s"] else None
  rows = []
  for c in fitting + rest:
    r = c.report
    rows.append(
      {
        "overrides": c.overrides,
        "fits": r["fits"],
        "tokens_per_s": r["tokens_per_s"],
        "mfu": r["mfu"],
        "step_s": r["step_s"],
        "memory_per_device": r["memory_per_device"]["total"],
        "hbm": r["memory_per_device"]["hbm"],
        "compile_s": c.compile_s,
        "cached": c.cached,
      }
    )
  skipped = [{"overrides": c.overrides, "why": c.why} for c in found if c.status in ("pruned", "cut")]
  if best is not None:
    best = {**best, "overrides": fitting[0].overrides}
  compiled = sum(not c.cached and c.report["compiled"] for c in planned)
  return {"candidates": rows, "skipped": skipped, "best": best, "compiled": compiled}


def format_overrides(overrides: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def format_search(found: dict, name: str) -> str:
  """The candidates as a table, then the winner's report and the overrides to paste."""
  lines = [
    f"{'data':>4} {'fsdp':>4} {'tensor':>6} {'remat':<13} {'accum':>5} {'scan':>5} "
    f"{'memory/device':>14} {'fits':>4} {'step s':>9} {'MFU':>6} {'tokens/s':>12} {'compile s':>10}"
  ]
  for row in found["candidates"]:
    o = row["overrides"]
    compile_s = "cached" if row["cached"] else f"{row['compile_s']:.0f}"
    lines.append(
      f"{o['mesh.data']:>4} {o['mesh.fsdp']:>4} {o['mesh.tensor']:>6} {o['model.remat']:<13} "
      f"{o['optim.grad_accum_steps']:>5} {'yes' if o['model.scan_layers'] else 'no':>5} "
      f"{plan_lib._size(row['memory_per_device']):>14} {'yes' if row['fits'] else 'NO':>4} "
      f"{row['step_s'] or 0:>9.4g} {100 * (row['mfu'] or 0):>5.1f}% {row['tokens_per_s'] or 0:>12,.0f} {compile_s:>10}"
    )
  lines.append(
    f"{len(found['candidates'])} planned; {len(found['skipped'])} not compiled "
    "(ruled out by a planned one's fit, or over --max-candidates / --time-budget)"
  )
  best = found["best"]
  if best is None:
    lines.append("no candidate fits with a step time: see the table")
    return "\n".join(lines)
  lines += ["", plan_lib.format_report(best, name), "", "the fastest layout that fits:"]
  lines.append(format_overrides(best["overrides"]))
  return "\n".join(lines)


def run(args, cfg: ml_collections.ConfigDict) -> int:
  """`lm plan --search`: prints the table (or JSON); UserError if nothing fits."""
  planner = plan_lib.Planner(args.topology, log=lambda text: print(f"lm plan: {text}", file=sys.stderr))
  found = search(
    cfg,
    planner,
    max_candidates=args.max_candidates,
    time_budget=args.time_budget,
    jobs=args.jobs or default_jobs(),
    cache=Cache(args.cache_dir),
    log=planner.log,
  )
  print(json.dumps(found) if args.json else format_search(found, args.config))
  if found["best"] is None:
    raise UserError(f"{args.config}: no searched layout fits {args.topology}")
  return 0
