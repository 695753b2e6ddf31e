"""Sweeps: grids of config overrides defined in experiment files, their runner and their results table.

An experiment file may define `get_sweep()`, returning a list of points: dicts of dotted config keys to
values, with an optional `"id"` naming the point's sub-workdir. Helpers build the usual grids:
- `model_shape` / `size_ladder`: d_model, n_layers and heads for a target N, with d_model = aspect * n_layers
  (Kaplan et al. find loss flat over aspect ratios 20-200), head_dim fixed, d_ff = 8/3 d_model rounded up
  to a multiple of 32 (SwiGLU at the parameter count of a 4x MLP);
- `isoflop_grid`: for each budget C and shape, train.steps = C / (FLOPs per token x tokens per step) under
  the config's convention; lr scales as 1 / d_model from the base config's (lr, d_model), and warmup
  lasts N tokens (Porian et al. 2024), at most a fifth of the run;
- `grid`: the Cartesian product of value lists, e.g. lr x batch size;
- `cooldown_branches` (Hägele et al. 2024): per model size one WSD run, and each shorter budget a branch
  (`"branch_of": id`) that starts its cooldown from the long run's checkpoint, so that one run per size
  yields every token budget for the compute of the longest run plus the cooldowns.
`run_sweep` trains each point in turn in `DIR/<id>` with `lm.train.train`; a point with `result.json`
is finished and skipped, a point without it resumes from its checkpoint. A branch source is trained up to
each branch's step just before that branch starts (see `plan`). Points sharing a tokenizer config reuse
the first point's tokenizer, so every run sees the same tokens. `aggregate` writes `DIR/results.csv` (one
row per run) and `DIR/curves.csv` (every eval of every run, for Approach 1). `plan_points` trains nothing:
it compiles every point for a TPU topology with `lm.plan` (`lm sweep --plan`).
"""

import copy
import csv
import dataclasses
import itertools
import json
import math
import time

import ml_collections
from etils import epath

from lm import config as config_lib
from lm import metrics as metrics_lib
from lm.errors import UserError
from lm.scaling import accounting

RESULT_COLUMNS = (
  "id",
  "N",
  "N_non_embedding",
  "N_all_experts",
  "N_active",
  "N_total",
  "D",
  "C",
  "C_spent",
  "flops_convention",
  "loss",
  "best_eval_loss",
  "steps",
  "wall_s",
  "flags",
)


def model_shape(target_n: float, vocab: int, aspect: int = 64, head_dim: int = 32, kv_heads_ratio: int = 1) -> dict:
  """Model overrides whose N (blocks + head, `flop_params`) is closest to `target_n` under the ladder rules."""
  best = None
  for layers in range(1, 129):
    d_model = max(head_dim, round(aspect * layers / head_dim) * head_dim)
    heads = d_model // head_dim
    shape = {
      "model.d_model": d_model,
      "model.n_layers": layers,
      "model.n_heads": heads,
      "model.n_kv_heads": max(1, heads // kv_heads_ratio),
      "model.d_ff": math.ceil(8 * d_model / 3 / 32) * 32,
    }
    gap = abs(math.log(_params(shape, vocab)["flop_params"] / target_n))
    if best is None or gap < best[0]:
      best = (gap, shape)
  return best[1]


def size_ladder(targets: list[float], vocab: int, **rules) -> list[dict]:
  """`model_shape` of each target N; the rules (aspect, head_dim, kv_heads_ratio) apply to every rung."""
  return [model_shape(n, vocab, **rules) for n in targets]


def _params(shape: dict, vocab: int) -> dict:
  cfg = config_lib.default_config()
  for key, value in shape.items():
    config_lib.set_key(cfg, key, value)
  return accounting.accounting(cfg, vocab)["params"]


def isoflop_grid(base: ml_collections.ConfigDict, budgets: list[float], shapes: list[dict], vocab: int) -> list[dict]:
  """Points (budget x shape) training for C FLOPs under `base.train.flops_convention`, with scaled lr and warmup."""
  points = []
  tokens_per_step = base.train.batch_size * base.data.seq_len
  for budget in budgets:
    for shape in shapes:
      cfg = apply_point(base, shape)
      acc = accounting.accounting(cfg, vocab)
      steps = max(1, round(budget / (acc["flops_per_token"][cfg.train.flops_convention] * tokens_per_step)))
      n = acc["params"]["flop_params"]
      points.append(
        {
          "id": f"C{budget:.2g}_N{n:.2e}".replace("+", ""),
          **shape,
          "train.steps": steps,
          "optim.lr": float(f"{base.optim.lr * base.model.d_model / shape['model.d_model']:.4g}"),
          "optim.warmup_steps": max(1, min(round(n / tokens_per_step), steps // 5)),
        }
      )
  return points


def grid(axes: dict[str, list]) -> list[dict]:
  """The Cartesian product of `{key: [values]}` as points."""
  keys = list(axes)
  return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def cooldown_branches(points: list[dict], cooldown_fraction: float = 0.2) -> list[dict]:
  """Hägele et al. (2024): per model shape, the longest point becomes a WSD run and every shorter one a branch
  of it (`"branch_of": its id`) that starts its own cooldown from the long run's checkpoint.

  Points share a shape when all their keys but id, train.steps and optim.warmup_steps agree. All get
  `optim.schedule = "wsd"` with `cooldown_fraction`, and the shortest warmup of their shape, so that a branch
  differs from its source in train.steps only and the source is still at its peak lr where each branch starts.
  """

  def shape_of(point: dict) -> str:
    return repr(sorted((k, v) for k, v in point.items() if k not in ("id", "train.steps", "optim.warmup_steps")))

  groups: dict[str, list[dict]] = {}
  for point in points:
    if "id" not in point:
      raise UserError("cooldown_branches needs points with an id (isoflop_grid gives them one)")
    groups.setdefault(shape_of(point), []).append(point)
  out = []
  for point in points:
    members = groups[shape_of(point)]
    source = max(members, key=lambda p: p["train.steps"])
    branched = {**point, "optim.schedule": "wsd", "optim.cooldown_fraction": cooldown_fraction}
    warmups = [p["optim.warmup_steps"] for p in members if "optim.warmup_steps" in p]
    if warmups:
      branched["optim.warmup_steps"] = min(warmups)
    if point is not source:
      branched["branch_of"] = source["id"]
    out.append(branched)
  return out


def cooldown_start(cfg: ml_collections.ConfigDict) -> int:
  """The last step at peak lr of a WSD run, where `lm.optim.make_schedule` starts its cooldown."""
  return cfg.train.steps - max(int(round(cfg.optim.cooldown_fraction * cfg.train.steps)), 1)


SPECIAL_KEYS = ("id", "branch_of")


def apply_point(base: ml_collections.ConfigDict, point: dict) -> ml_collections.ConfigDict:
  """A copy of `base` with the point's overrides (`id` and `branch_of` aside)."""
  cfg = copy.deepcopy(base)
  for key, value in point.items():
    if key not in SPECIAL_KEYS:
      config_lib.set_key(cfg, key, value)
  return cfg


Point = tuple[str, ml_collections.ConfigDict, dict]  # (id, config, the point's overrides)


def load_sweep(path: str, overrides: list[str] = (), workdir: str = ".") -> list[Point]:
  """(id, config, point) of each point of the experiment file's `get_sweep()`; overrides apply to all.

  A branch's config gets `train.init_from = workdir/<source id>/checkpoints/<cooldown_start>`.
  """
  base = config_lib.load_config(path, overrides)
  module = config_lib.load_module(path)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"{path} defines no get_sweep()")
  try:
    points = module.get_sweep()
  except UserError:
    raise
  except Exception as e:  # an experiment file is user code: report its error in one line
    raise UserError(f"{path}: get_sweep() raised {type(e).__name__}: {e}") from e
  if not points:
    raise UserError(f"{path}: get_sweep() returned no points")
  out, seen = [], set()
  for i, point in enumerate(points):
    point_id = str(point.get("id", f"p{i:03d}"))
    if point_id in seen or "/" in point_id:
      raise UserError(f"{path}: sweep point id {point_id!r} is repeated or contains '/'")
    seen.add(point_id)
    cfg = apply_point(base, point)
    for item in overrides:  # command-line overrides win over the sweep's values
      config_lib.apply_override(cfg, item)
    out.append((point_id, cfg, point))
  by_id = {point_id: (cfg, point) for point_id, cfg, point in out}
  for point_id, cfg, point in out:
    if "branch_of" in point:
      source = point["branch_of"]
      _check_branch(path, point_id, cfg, source, by_id)
      config_lib.set_key(cfg, "train.init_from", f"{workdir.rstrip('/')}/{source}/checkpoints/{cooldown_start(cfg)}")
    config_lib.validate(cfg)
  return out


def _check_branch(path: str, point_id: str, cfg, source: str, by_id: dict) -> None:
  """Raises UserError unless `point_id` can branch from point `source` at its own cooldown start."""
  where = f"{path}: sweep point {point_id!r} (branch_of {source!r})"
  if source not in by_id or "branch_of" in by_id[source][1]:
    raise UserError(f"{where}: the source must be a point of the sweep that is not itself a branch")
  source_cfg = by_id[source][0]
  changed = config_lib.incompatible_changes(source_cfg, cfg)
  if changed:
    raise UserError(f"{where} may differ from its source in train.steps only, not {', '.join(changed)}")
  if cfg.optim.schedule != "wsd" or source_cfg.train.max_tokens or source_cfg.train.max_flops:
    raise UserError(f"{where}: branching needs optim.schedule 'wsd' and a source without train.max_tokens/max_flops")
  step = cooldown_start(cfg)
  if not cfg.optim.warmup_steps <= step <= cooldown_start(source_cfg):
    raise UserError(
      f"{where}: its cooldown would start at step {step}, outside the source's constant-lr phase "
      f"(steps {cfg.optim.warmup_steps} to {cooldown_start(source_cfg)})"
    )


@dataclasses.dataclass
class Run:
  """One `lm train` invocation of a sweep: a point, or a branch source trained up to a branch's step."""

  point_id: str
  cfg: ml_collections.ConfigDict
  point: dict
  stop_for: str | None = None  # the branch this segment of its source is for
  stop_step: int | None = None


def plan(points: list[Point]) -> list[Run]:
  """The order of invocations: each branch source trains up to every branch's step just before that branch
  starts from it (so its newest checkpoint is the one the branch names), then on to its own end.

  A source segment stops by `train.stop_at_step`, which leaves its schedule the one of its full length (a
  budget such as train.max_tokens would shorten it): a WSD source is still in its stable phase there."""
  branches: dict[str, list[tuple[int, str, ml_collections.ConfigDict, dict]]] = {}
  for point_id, cfg, point in points:
    if "branch_of" in point:
      branches.setdefault(point["branch_of"], []).append((cooldown_start(cfg), point_id, cfg, point))
  by_id = {point_id: (cfg, point) for point_id, cfg, point in points}
  runs, planned = [], set()
  for point_id, _, point in points:
    source = point.get("branch_of", point_id)
    if source in planned:
      continue
    planned.add(source)
    source_cfg, source_point = by_id[source]
    for step, branch_id, branch_cfg, branch_point in sorted(branches.get(source, []), key=lambda b: b[:2]):
      segment = copy.deepcopy(source_cfg)
      segment.train.stop_at_step = step  # a stop, not a budget: the source keeps the schedule of its full length
      runs += [Run(source, segment, source_point, branch_id, step), Run(branch_id, branch_cfg, branch_point)]
    runs.append(Run(source, source_cfg, source_point))
  return runs


def commands(path: str, workdir: str, overrides: list[str] = ()) -> list[str]:
  """One `lm train` command line per invocation, in order, for any cluster launcher.

  A branch source appears once per branch, stopped by train.stop_at_step at the branch's step, and then in full.
  """
  lines = []
  for run in plan(load_sweep(path, overrides, workdir)):
    items = {k: v for k, v in run.point.items() if k not in SPECIAL_KEYS}
    if run.cfg.train.init_from:
      items["train.init_from"] = run.cfg.train.init_from
    if run.stop_step is not None:
      items["train.stop_at_step"] = run.stop_step
    args = [f"--config.{k}={v}" for k, v in items.items()] + [f"--config.{o}" for o in overrides]
    lines.append(" ".join(["lm train", f"--config {path}", f"--workdir {workdir}/{run.point_id}", *args]))
  return lines


def _newest_checkpoint(sub: epath.Path) -> int | None:
  steps = [int(p.name) for p in (sub / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps) if steps else None


def plan_points(path: str, topology: str, overrides: list[str] = (), progress: bool = True) -> tuple[list, int]:
  """`lm.plan` reports of every point for a TPU topology, as ([(id, report)], programs compiled).

  Points that differ only in steps, budget or lr schedule share one compile (see `lm.plan.program_key`).
  """
  import sys  # noqa: PLC0415

  from tqdm import tqdm  # noqa: PLC0415

  from lm import plan as plan_lib  # noqa: PLC0415

  points = load_sweep(path, overrides)
  planner = plan_lib.Planner(topology)
  rows = []
  bar = tqdm(points, desc=f"planning on {topology}", unit="point", file=sys.stderr, disable=not progress)
  for point_id, cfg, _ in bar:
    bar.set_postfix_str(point_id, refresh=True)
    rows.append((point_id, planner.plan(cfg)))
  return rows, planner.compiles


def search_points(args, overrides: list[str] = ()) -> tuple[list, int]:
  """`lm sweep --plan --search`: per point, the fastest layout that fits (`lm.plan_search`), as
  ([(id, best report, or the point's own report if no layout fits)], programs compiled)."""
  import sys  # noqa: PLC0415

  from lm import plan as plan_lib  # noqa: PLC0415
  from lm import plan_search  # noqa: PLC0415

  planner = plan_lib.Planner(args.topology, log=lambda text: print(f"lm sweep: {text}", file=sys.stderr))
  cache, jobs = plan_search.Cache(args.cache_dir), args.jobs or plan_search.default_jobs()
  rows, compiles = [], 0
  for point_id, cfg, _ in load_sweep(args.config, overrides):
    planner.log(f"searching layouts for {point_id}")
    found = plan_search.search(cfg, planner, args.max_candidates, args.time_budget, jobs, cache, planner.log)
    rows.append((point_id, found["best"] or planner.plan(cfg)))
    compiles += found["compiled"]
  return rows, compiles


def run_sweep(path: str, workdir: str, overrides: list[str] = (), progress: bool = True) -> str:
  """Trains every unfinished point in turn; returns the path of the aggregated `results.csv`.

  A point with `result.json` is finished and skipped; one with checkpoints resumes from them. A signal that
  stops a run (SIGTERM, Ctrl-C) stops the sweep after that run's checkpoint: run the command again to resume.
  """
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  lead = jax.process_index() == 0  # in a multi-process sweep, process 0 alone prints and writes sweep files
  say = print if lead else (lambda *_: None)
  root = epath.Path(workdir)
  share_compilation_cache(workdir)
  started_here = set()
  for run in plan(load_sweep(path, overrides, workdir)):
    sub = root / run.point_id
    if (sub / "result.json").exists():
      if run.stop_step is None:
        say(f"sweep: {run.point_id} finished, skipped")
      continue
    if run.stop_for is not None:
      branch = root / run.stop_for
      if (branch / "result.json").exists() or _newest_checkpoint(branch) is not None:
        continue  # the branch has started: it needs no more of its source
      if _newest_checkpoint(sub) == run.stop_step:
        continue
      say(f"sweep: training {run.point_id} to step {run.stop_step}, where {run.stop_for} branches off")
    elif run.cfg.train.init_from and _newest_checkpoint(sub) is None:
      say(f"sweep: branching {run.point_id} from {run.cfg.train.init_from}")
    else:
      say(f"sweep: training {run.point_id}")
    final = train_point(root, run.point_id, run.cfg, progress, started_here, finishes=run.stop_step is None)
    if "stopped_by" in final:
      say(f"sweep: stopped by {final['stopped_by']} in {run.point_id}; run the same command again to resume")
      break
  path = aggregate(workdir) if lead else str(root / "results.csv")
  multihost_utils.sync_global_devices("lm sweep: done")  # no process looks at the results before they exist
  return path


def share_compilation_cache(workdir: str) -> None:
  """Runs of one size, and a source's segments and branches, compile the same programs: compile them once."""
  import jax  # noqa: PLC0415

  if "://" not in workdir and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(epath.Path(workdir).absolute() / "jax_cache"))


def train_point(
  root: epath.Path, point_id: str, cfg: ml_collections.ConfigDict, progress: bool, started_here: set, finishes: bool
) -> dict:
  """Trains or resumes the run `root/point_id`; returns `lm.train.train`'s final metrics.

  `sweep.json` keeps the wall time of all its invocations and whether one resumed another's checkpoint;
  when the run ends (`finishes`, and no signal stopped it) `result.json` marks it finished for later
  invocations and for `aggregate`. `started_here` holds the ids this command has started (updated)."""
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from lm import train  # noqa: PLC0415

  lead = jax.process_index() == 0
  sub = root / point_id
  progress_path = sub / "sweep.json"
  record = json.loads(progress_path.read_text()) if progress_path.exists() else {"wall_s": 0.0, "resumed": False}
  record["resumed"] |= point_id not in started_here and _newest_checkpoint(sub) is not None
  started_here.add(point_id)
  if lead:
    _share_tokenizer(root, sub, cfg)
  multihost_utils.sync_global_devices(f"lm sweep: {point_id} set up")  # every process sees the shared tokenizer
  start = time.perf_counter()
  final = train.train(cfg, str(sub), progress=progress)
  record["wall_s"] += time.perf_counter() - start
  if lead:
    progress_path.write_text(json.dumps(record))
    if finishes and "stopped_by" not in final:
      (sub / "result.json").write_text(json.dumps({"id": point_id, "final": final, **record}, indent=2))
  return final


def _share_tokenizer(root: epath.Path, sub: epath.Path, cfg: ml_collections.ConfigDict) -> None:
  """Copies the tokenizer of an earlier point with the same tokenizer and data config into `sub`. A point that
  starts from another run's params (`train.init_from`) takes that run's tokenizer instead, which `lm train`
  copies; for the same reason such a point is never the earlier one (an SFT stage's `data.source` may name one
  corpus while its tokenizer came from a pre-training on another)."""
  if (sub / "tokenizer.json").exists() or cfg.tokenizer.kind == "byte" or cfg.train.init_from:
    return
  key = (cfg.tokenizer.to_dict(), cfg.data.source, cfg.data.max_bytes, cfg.data.eval_fraction, cfg.data.eval_split)
  for other in sorted(root.glob("*/tokenizer.json")):
    other_cfg = config_lib.from_json((other.parent / "config.json").read_text())
    d = other_cfg.data
    if other_cfg.train.init_from:
      continue
    if (other_cfg.tokenizer.to_dict(), d.source, d.max_bytes, d.eval_fraction, d.eval_split) == key:
      _copy_tokenizer(other.parent, sub)
      return


def _copy_tokenizer(source: epath.Path, sub: epath.Path) -> None:
  from lm import tokenizer as tokenizer_lib  # noqa: PLC0415

  sub.mkdir(parents=True, exist_ok=True)
  for name in ("tokenizer.json", *tokenizer_lib.MODEL_FILES.values()):
    if (source / name).exists():
      (sub / name).write_bytes((source / name).read_bytes())  # epath: local or gs://


def aggregate(workdir: str) -> str:
  """Writes `results.csv` and `curves.csv` from every finished sub-workdir; returns the results path.

  C is the compute the run's result stands for; C_spent what its own invocations trained (for a branch,
  only its cooldown: the steps before it were its source's).
  """
  root = epath.Path(workdir)
  results, curves, extra_columns = [], [], {}
  for result_path in sorted(root.glob("*/result.json")):
    sub = result_path.parent
    record = json.loads(result_path.read_text())
    cfg = config_lib.from_json((sub / "config.json").read_text())
    vocab = json.loads((sub / "tokenizer.json").read_text())["vocab_size"]
    params = accounting.accounting(cfg, vocab)["params"]
    rows = [r for r in metrics_lib.read_metrics(str(sub)) if r.get("eval/loss") is not None]
    if not rows:
      continue
    last = rows[-1]
    flags = [f for f, on in (("resumed", record["resumed"]), ("wsd", cfg.optim.schedule == "wsd")) if on]
    source, branch_step = config_lib.init_from(cfg)  # a run started from another's params trained all its steps
    branch_step = branch_step or 0
    if branch_step:
      flags.append(f"branch:{epath.Path(source).name}@{branch_step}")
    results.append(
      {
        "id": record["id"],
        "N": params["flop_params"],
        "N_non_embedding": params["non_embedding"],
        "N_all_experts": params["flop_params_total"],
        "N_active": params["active"],
        "N_total": params["total"],
        "D": last["tokens"],
        "C": last["flops"],
        "C_spent": last["flops"] * (1 - branch_step * cfg.train.batch_size * cfg.data.seq_len / last["tokens"]),
        "flops_convention": cfg.train.flops_convention,
        "loss": last["eval/loss"],
        "best_eval_loss": min(r["eval/loss"] for r in rows),
        "steps": last["step"],
        "wall_s": round(record["wall_s"], 2),
        "flags": ";".join(flags),
        **eval_set_columns(last),
        **recorded_eval_columns(sub),
      }
    )
    extra_columns.update(dict.fromkeys([*eval_set_columns(last), *recorded_eval_columns(sub)]))
    curves += [
      {"id": record["id"], "N": params["flop_params"], "D": r["tokens"], "C": r["flops"], "loss": r["eval/loss"]}
      for r in rows
    ]
  if not results:
    raise UserError(f"{workdir} holds no finished sweep points (DIR/<id>/result.json)")
  _write_csv(root / "curves.csv", ("id", "N", "D", "C", "loss"), curves)
  return _write_csv(root / "results.csv", RESULT_COLUMNS + tuple(extra_columns), results)


def eval_set_columns(row: dict) -> dict:
  """results.csv columns of a run's last eval: `bpb`, and `loss_NAME`, `bpb_NAME` for each eval source, and
  `METRIC_TASK` for each downstream task of `train.evals` (`acc_kv_recall`; not the per-group breakdowns)."""
  columns = {"bpb": row.get("eval/bpb")}
  for key, value in row.items():
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("loss", "bpb", *DOWNSTREAM_METRICS):
      columns[f"{parts[2]}_{parts[1]}"] = value
  return columns


DOWNSTREAM_METRICS = ("acc", "acc_norm", "exact_match", "bits_per_byte", "byte_perplexity")  # lm.evals.tasks


def recorded_eval_columns(sub: epath.Path) -> dict:
  """`METRIC_TASK` (and `METRIC_TASK_Kshot` for K shots) of each task `lm eval --record` scored the run on, the
  latest record of each (task, shots) winning; per-group breakdowns and standard errors left out."""
  path = sub / "evals.jsonl"
  if not path.exists():
    return {}
  columns = {}
  for line in path.read_text().splitlines():
    record = json.loads(line)
    suffix = f"_{record['shots']}shot" if record.get("shots") else ""
    for metric, value in record.items():
      if metric in DOWNSTREAM_METRICS:
        columns[f"{metric}_{record['task']}{suffix}"] = value
  return columns


def _write_csv(path: epath.Path, columns, rows: list[dict]) -> str:
  with path.open("w") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return str(path)
