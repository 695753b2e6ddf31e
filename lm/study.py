"""Studies: chains of dependent stages defined in an experiment file and run by `lm study`.

A study file defines `get_study(workdir) -> list[dict]`, its stages in order, each with an `"id"` (its
directory `workdir/<id>`) and either
- `"config"`: an experiment file (a path relative to the study file) trained like a sweep point, with
  optional `"overrides"` ({dotted key: value}) and `"init_from"`: the id of an earlier run stage, whose
  newest good checkpoint the run starts from (`train.init_from`); or
- `"run"`: a callable `stage_dir -> dict`, a step such as writing data or an evaluation; its dict is the
  stage's result.
and optionally `get_report(results) -> dict`, the study's headline numbers from `{id: result}` (a run's
result is its final metrics). `lm study` runs the stages in order and skips finished ones (those with
`result.json`, as `lm sweep` does); an interrupted run resumes from its checkpoint, an interrupted step
starts again. It then writes `workdir/report/report.json` (the headline numbers and every stage's result)
and `report.md`. Runs go through `lm.scaling.sweep.train_point`, so a stage is trained, resumed and
recorded exactly as a sweep point is.
"""

import json
import os
import time

from etils import epath

from lm import config as config_lib
from lm.errors import UserError


def load_study(path: str, workdir: str, overrides: list[str] = ()) -> list[dict]:
  """The stages of the study file at `path`, run stages with their validated `cfg`.

  Command-line overrides apply to every run stage, after the stage's own."""
  module = config_lib.load_module(path)
  if not hasattr(module, "get_study"):
    raise UserError(f"{path} defines no get_study(workdir)")
  try:
    stages = module.get_study(workdir.rstrip("/"))
  except UserError:
    raise
  except Exception as e:  # a study file is user code: report its error in one line
    raise UserError(f"{path}: get_study() raised {type(e).__name__}: {e}") from e
  if not stages:
    raise UserError(f"{path}: get_study() returned no stages")
  seen, runs = set(), set()
  out = []
  for stage in stages:
    stage_id = str(stage.get("id", ""))
    where = f"{path}: stage {stage_id!r}"
    if not stage_id or stage_id in seen or "/" in stage_id or stage_id == "report":
      raise UserError(f"{where}: every stage needs an id that is unique, not 'report' and without '/'")
    seen.add(stage_id)
    if ("config" in stage) == ("run" in stage):
      raise UserError(f"{where} needs exactly one of 'config' (a run) and 'run' (a step)")
    stage = dict(stage, id=stage_id)
    if "run" in stage:
      if not callable(stage["run"]):
        raise UserError(f"{where}: 'run' must be a callable taking the stage's directory")
      out.append(stage)
      continue
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), stage["config"])
    cfg = config_lib.load_config(config_path)
    for key, value in stage.get("overrides", {}).items():
      config_lib.set_key(cfg, key, value)
    for item in overrides:
      config_lib.apply_override(cfg, item)
    source = stage.get("init_from")
    if source is not None:
      if source not in runs:
        raise UserError(f"{where}: init_from {source!r} must name an earlier run stage")
      config_lib.set_key(cfg, "train.init_from", f"{workdir.rstrip('/')}/{source}")
    config_lib.validate(cfg)
    runs.add(stage_id)
    out.append({**stage, "cfg": cfg})
  return out


def run_study(path: str, workdir: str, overrides: list[str] = (), progress: bool = True) -> str:
  """Runs every unfinished stage in order; returns the path of `report.json`.

  A signal that stops a run stops the study after that run's checkpoint: run the command again to resume."""
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from lm.scaling import sweep  # noqa: PLC0415

  lead = jax.process_index() == 0
  say = print if lead else (lambda *_: None)
  root = epath.Path(workdir)
  stages = load_study(path, workdir, overrides)
  sweep.share_compilation_cache(workdir)
  started_here: set = set()
  for stage in stages:
    sub = root / stage["id"]
    if (sub / "result.json").exists():
      say(f"study: {stage['id']} finished, skipped")
      continue
    if "cfg" in stage:
      say(f"study: training {stage['id']}" + (f" from {stage['init_from']}" if stage.get("init_from") else ""))
      final = sweep.train_point(root, stage["id"], stage["cfg"], progress, started_here, finishes=True)
      if "stopped_by" in final:
        say(f"study: stopped by {final['stopped_by']} in {stage['id']}; run the same command again to resume")
        return str(root / "report" / "report.json")
      continue
    say(f"study: running {stage['id']}")
    sub.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = stage["run"](str(sub))
    if not isinstance(result, dict):
      raise UserError(f"{path}: stage {stage['id']!r} returned {type(result).__name__}, not a dict")
    if lead:
      record = {"id": stage["id"], "final": result, "wall_s": time.perf_counter() - start}
      (sub / "result.json").write_text(json.dumps(record, indent=2))
    multihost_utils.sync_global_devices(f"lm study: {stage['id']} done")
  report = write_report(path, workdir, stages) if lead else str(root / "report" / "report.json")
  multihost_utils.sync_global_devices("lm study: done")
  return report


def write_report(path: str, workdir: str, stages: list[dict]) -> str:
  """Writes `report/report.json` and `report/report.md` from the stages' `result.json`; returns the JSON's path."""
  root = epath.Path(workdir)
  records = {s["id"]: json.loads((root / s["id"] / "result.json").read_text()) for s in stages}
  results = {stage_id: record["final"] for stage_id, record in records.items()}
  module = config_lib.load_module(path)
  headline = {}
  if hasattr(module, "get_report"):
    try:
      headline = module.get_report(results)
    except Exception as e:  # user code
      raise UserError(f"{path}: get_report() raised {type(e).__name__}: {e}") from e
  report = {
    **headline,
    "stages": {
      s["id"]: {
        "kind": "run" if "cfg" in s else "step",
        "init_from": s.get("init_from"),
        "wall_s": round(records[s["id"]]["wall_s"], 1),
        "result": records[s["id"]]["final"],
      }
      for s in stages
    },
  }
  out = root / "report"
  out.mkdir(parents=True, exist_ok=True)
  (out / "report.json").write_text(json.dumps(report, indent=2))
  (out / "report.md").write_text(markdown(path, headline, report["stages"]))
  return str(out / "report.json")


def markdown(path: str, headline: dict, stages: dict) -> str:
  """The report as Markdown: the headline numbers, then one row per stage."""
  lines = [f"# Study: {os.path.basename(path)}", ""]
  if headline:
    lines += ["| result | value |", "|---|---|"]
    lines += [f"| {key} | {_shown(value)} |" for key, value in headline.items()]
    lines.append("")
  lines += ["| stage | kind | from | wall (s) | result |", "|---|---|---|---|---|"]
  for stage_id, s in stages.items():
    numbers = {k: v for k, v in s["result"].items() if isinstance(v, int | float) and not isinstance(v, bool)}
    shown = ", ".join(f"{k} {_shown(v)}" for k, v in list(numbers.items())[:6])
    lines.append(f"| {stage_id} | {s['kind']} | {s['init_from'] or ''} | {s['wall_s']:.0f} | {shown} |")
  return "\n".join(lines) + "\n"


def _shown(value) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)
