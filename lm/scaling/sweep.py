"""Sweeps: grids of config overrides defined in experiment files, their runner and their results table.

An experiment file may define `get_sweep()`, returning a list of points: dicts of dotted config keys to
values, with an optional `"id"` naming the point's sub-workdir. Helpers build the usual grids:
- `model_shape` / `size_ladder`: d_model, n_layers and heads for a target N, with d_model = aspect * n_layers
  (Kaplan et al. find loss flat over aspect ratios 20-200), head_dim fixed, d_ff = 8/3 d_model rounded up
  to a multiple of 32 (SwiGLU at the parameter count of a 4x MLP);
- `isoflop_grid`: for each budget C and shape, train.steps = C / (FLOPs per token x tokens per step) under
  the config's convention; lr scales as 1 / d_model from the base config's (lr, d_model), and warmup
  lasts N tokens (Porian et al. 2024), at most a fifth of the run;
- `grid`: the Cartesian product of value lists, e.g. lr x batch size.
`run_sweep` trains each point in turn in `DIR/<id>` with `lm.train.train`; a point with `result.json`
is finished and skipped, a point without it resumes from its checkpoint. Points sharing a tokenizer
config reuse the first point's tokenizer, so every run sees the same tokens. `aggregate` writes
`DIR/results.csv` (one row per run) and `DIR/curves.csv` (every eval of every run, for Approach 1).
"""

import copy
import csv
import itertools
import json
import math
import shutil
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
  "N_total",
  "D",
  "C",
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
          "optim.lr": base.optim.lr * base.model.d_model / shape["model.d_model"],
          "optim.warmup_steps": max(1, min(round(n / tokens_per_step), steps // 5)),
        }
      )
  return points


def grid(axes: dict[str, list]) -> list[dict]:
  """The Cartesian product of `{key: [values]}` as points."""
  keys = list(axes)
  return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def apply_point(base: ml_collections.ConfigDict, point: dict) -> ml_collections.ConfigDict:
  """A copy of `base` with the point's overrides (its `id` aside)."""
  cfg = copy.deepcopy(base)
  for key, value in point.items():
    if key != "id":
      config_lib.set_key(cfg, key, value)
  return cfg


def load_sweep(path: str, overrides: list[str] = ()) -> list[tuple[str, ml_collections.ConfigDict, dict]]:
  """(id, config, point) of each point of the experiment file's `get_sweep()`; overrides apply to all."""
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
    config_lib.validate(cfg)
    out.append((point_id, cfg, point))
  return out


def commands(path: str, workdir: str, overrides: list[str] = ()) -> list[str]:
  """One `lm train` command line per point, for any cluster launcher."""
  lines = []
  for point_id, _, point in load_sweep(path, overrides):
    items = [f"--config.{k}={v}" for k, v in point.items() if k != "id"] + [f"--config.{o}" for o in overrides]
    lines.append(" ".join(["lm train", f"--config {path}", f"--workdir {workdir}/{point_id}", *items]))
  return lines


def run_sweep(path: str, workdir: str, overrides: list[str] = (), progress: bool = True) -> str:
  """Trains every unfinished point in turn; returns the path of the aggregated `results.csv`."""
  from lm import train  # noqa: PLC0415

  root = epath.Path(workdir)
  for point_id, cfg, _ in load_sweep(path, overrides):
    sub = root / point_id
    if (sub / "result.json").exists():
      print(f"sweep: {point_id} finished, skipped")
      continue
    resumed = (sub / "checkpoints").exists()
    _share_tokenizer(root, sub, cfg)
    print(f"sweep: {'resuming' if resumed else 'training'} {point_id}")
    start = time.perf_counter()
    final = train.train(cfg, str(sub), progress=progress)
    record = {"id": point_id, "final": final, "wall_s": time.perf_counter() - start, "resumed": resumed}
    (sub / "result.json").write_text(json.dumps(record, indent=2))
  return aggregate(workdir)


def _share_tokenizer(root: epath.Path, sub: epath.Path, cfg: ml_collections.ConfigDict) -> None:
  """Copies the tokenizer of an earlier point with the same tokenizer and data config into `sub`."""
  if (sub / "tokenizer.json").exists() or cfg.tokenizer.kind == "byte":
    return
  key = (cfg.tokenizer.to_dict(), cfg.data.source, cfg.data.max_bytes)
  for other in sorted(root.glob("*/tokenizer.json")):
    other_cfg = config_lib.from_json((other.parent / "config.json").read_text())
    if (other_cfg.tokenizer.to_dict(), other_cfg.data.source, other_cfg.data.max_bytes) == key:
      sub.mkdir(parents=True, exist_ok=True)
      for name in ("tokenizer.json", "tokenizer.model"):
        if (other.parent / name).exists():
          shutil.copy(str(other.parent / name), str(sub / name))
      return


def aggregate(workdir: str) -> str:
  """Writes `results.csv` and `curves.csv` from every finished sub-workdir; returns the results path."""
  root = epath.Path(workdir)
  results, curves = [], []
  for result_path in sorted(root.glob("*/result.json")):
    sub = result_path.parent
    record = json.loads(result_path.read_text())
    cfg = config_lib.from_json((sub / "config.json").read_text())
    vocab = json.loads((sub / "tokenizer.json").read_text())["vocab_size"]
    params = accounting.accounting(cfg, vocab)["params"]
    rows = [r for r in metrics_lib.read_metrics(str(sub)) if r.get("eval/loss") is not None]
    if not rows:
      continue
    flags = [f for f, on in (("resumed", record["resumed"]), ("wsd", cfg.optim.schedule == "wsd")) if on]
    results.append(
      {
        "id": record["id"],
        "N": params["flop_params"],
        "N_non_embedding": params["non_embedding"],
        "N_total": params["total"],
        "D": rows[-1]["tokens"],
        "C": rows[-1]["flops"],
        "flops_convention": cfg.train.flops_convention,
        "loss": rows[-1]["eval/loss"],
        "best_eval_loss": min(r["eval/loss"] for r in rows),
        "steps": rows[-1]["step"],
        "wall_s": round(record["wall_s"], 2),
        "flags": ";".join(flags),
      }
    )
    curves += [
      {"id": record["id"], "N": params["flop_params"], "D": r["tokens"], "C": r["flops"], "loss": r["eval/loss"]}
      for r in rows
    ]
  if not results:
    raise UserError(f"{workdir} holds no finished sweep points (DIR/<id>/result.json)")
  _write_csv(root / "curves.csv", ("id", "N", "D", "C", "loss"), curves)
  return _write_csv(root / "results.csv", RESULT_COLUMNS, results)


def _write_csv(path: epath.Path, columns, rows: list[dict]) -> str:
  with path.open("w") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return str(path)
