"""`lm eval`: downstream tasks on a run's checkpoint, one JSON line per task (`lm.evals.tasks`).

lm eval --workdir DIR --tasks T1,T2 [--shots K] [--limit N] [--chat] [--out F.json]
lm eval --list
lm eval --workdir DIR --harness T1,T2 [--include-path DIR]   (tasks of the lm-evaluation-harness)

A task is a built-in name (`lm eval --list`), a task file (`*.json`), or `bpb:SOURCE`, bits per byte on any
`data.source` (its held-out documents by the run's hash split; `bpb:all:SOURCE` for every document);
`NAME=TASK` gives it another name. `train.evals` takes the same entries.
"""

import json
import sys

from etils import epath

from lm.errors import UserError
from lm.evals import icl, tasks


def list_tasks() -> list[dict]:
  return [
    {"task": name, "kind": (task := make()).kind, "examples": len(task.examples), "about": icl.ABOUT[name]}
    for name, make in icl.BUILTIN.items()
  ]


def main(args) -> None:
  if args.list:
    for row in list_tasks():
      print(json.dumps(row))
    return
  if not args.workdir:
    raise UserError("lm eval needs --workdir (or --list)")
  if args.harness:
    try:
      from lm.evals import harness  # noqa: PLC0415  (the lm-evaluation-harness is a test extra)
    except ImportError as e:
      raise UserError(
        f"lm eval --harness needs the lm-evaluation-harness (pip install 'lm-eval==0.4.13'): {e}"
      ) from None

    names = [t for t in args.harness.split(",") if t]
    results = harness.run_harness(
      args.workdir, names, args.include_path, args.shots or None, args.limit or None, args.batch_size, args.step
    )
    for name, metrics in results.items():
      print(json.dumps({"task": name, "shots": args.shots, **metrics}))
    _write(args.out, {"workdir": args.workdir, "harness": results})
    return
  if not args.tasks:
    raise UserError("lm eval needs --tasks T1,T2 (lm eval --list names the built-in ones) or --harness")
  chosen = [tasks.resolve(name) for name in args.tasks.split(",") if name]
  from lm.evals import scoring  # noqa: PLC0415

  scorer = scoring.Scorer.from_run(args.workdir, args.step, args.batch_size)
  results, samples = [], {}
  for task in chosen:
    summary, per_example = tasks.evaluate(scorer, task, args.shots, args.limit, args.seed, args.chat)
    print(json.dumps(summary))
    sys.stdout.flush()
    results.append(summary)
    samples[task.name] = per_example
  _write(args.out, {"workdir": args.workdir, "step": scorer.step, "results": results, "samples": samples})
  if args.record:
    with (epath.Path(args.workdir) / "evals.jsonl").open("a") as f:
      f.writelines(json.dumps({"step": scorer.step, **r}) + "\n" for r in results)


def _write(path: str | None, record: dict) -> None:
  if path:
    epath.Path(path).write_text(json.dumps(record, indent=1, default=str) + "\n")


def add_parser(sub) -> None:
  p = sub.add_parser("eval", help="downstream tasks on a run's checkpoint; one JSON line per task")
  p.add_argument("--workdir", default=None, help="the run (its newest good checkpoint)")
  p.add_argument("--tasks", default="", help="comma-separated: built-in names, task files (*.json), bpb:SOURCE")
  p.add_argument("--harness", default="", help="comma-separated lm-evaluation-harness tasks instead")
  p.add_argument("--include-path", default=None, help="harness: a directory of extra task YAML files")
  p.add_argument("--shots", type=int, default=0, help="solved examples before each one (default 0)")
  p.add_argument("--limit", type=int, default=0, help="at most this many examples per task (0: all)")
  p.add_argument("--seed", type=int, default=0, help="the seed few-shot examples are drawn with")
  p.add_argument("--chat", action="store_true", help="prompt through the chat template (post-trained runs)")
  p.add_argument("--batch-size", type=int, default=16, help="rows scored or decoded at once")
  p.add_argument("--step", type=int, default=None, help="this checkpoint instead of the newest")
  p.add_argument("--out", default=None, help="also write the results and every example's record here (JSON)")
  p.add_argument("--list", action="store_true", help="print the built-in tasks")
  p.add_argument(
    "--record", action="store_true", help="also append the results to DIR/evals.jsonl (lm sweep's results.csv reads it)"
  )
