"""Subcommands `lm sweep`, `lm scaling fit|plot|report` and `lm bench fit`, for `lm.cli` to mount.

lm sweep --config FILE --workdir DIR [--print-commands] [--config.KEY=VALUE ...]
lm sweep --config FILE --plan --topology NAME [--config.KEY=VALUE ...]   (compiles each point for a TPU slice)
lm scaling fit TABLE.csv [--approach 1|2|3|kaplan|all] [--predict N,D] [--budget C] [--bootstrap N] [--out DIR]
lm scaling plot TABLE.csv --out DIR [--budget C]
lm scaling report DIR [--budget C] [--bootstrap N]
lm bench fit [--table CSV]   (lm.cli adds `fit` to its `bench` choices and `--table`)
"""

import contextlib
import json
import sys
import warnings

from etils import epath

from lm import distributed, plan_search
from lm.errors import UserError

DEFAULT_BENCH_TABLE = "../shared/data/scaling/chinchilla_240.csv"


def add_parsers(subparsers) -> None:
  """Adds the `sweep` and `scaling` subcommands to an argparse subparsers object."""
  p = subparsers.add_parser("sweep", help="run every point of an experiment's get_sweep(), one sub-workdir each")
  p.add_argument("--config", required=True, help="experiment file defining get_config() and get_sweep()")
  p.add_argument("--workdir", default=None, help="sweep directory: one sub-workdir per point, results.csv")
  p.add_argument("--print-commands", action="store_true", help="print one `lm train` command per run and exit")
  p.add_argument(
    "--plan", action="store_true", help="train nothing: per point, memory, step time, MFU and chip-hours (lm plan)"
  )
  p.add_argument("--topology", default=None, help="with --plan: the TPU slice, e.g. v5p:2x2x4")
  plan_search.add_arguments(p)
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  distributed.add_flags(p)

  p = subparsers.add_parser("scaling", help="fit scaling laws, plot them, write a report")
  sub = p.add_subparsers(dest="scaling_command", required=True, parser_class=type(p))
  f = sub.add_parser("fit", help="fit a CSV table with columns N, D, loss (C optional); JSON on stdout")
  f.add_argument("table")
  _add_fit_options(f)
  f.add_argument("--approach", default="all", choices=["1", "2", "3", "kaplan", "all"])
  f.add_argument("--predict", default=None, metavar="N,D", help="approach 3: the predicted loss at this (N, D)")
  f.add_argument("--out", default=None, help="also write fit.json into this directory")
  g = sub.add_parser("plot", help="the scaling figures of a table, as PNG and SVG")
  g.add_argument("table")
  g.add_argument("--out", required=True, help="output directory")
  _add_fit_options(g)
  r = sub.add_parser("report", help="fit a sweep's results.csv; write DIR/report/report.md, fit.json and figures")
  r.add_argument("workdir")
  _add_fit_options(r)


def _add_fit_options(p) -> None:
  p.add_argument("--budget", type=float, default=None, help="compute budget C (FLOPs) for the optimal allocation")
  p.add_argument(
    "--loss-column", default="loss", help="the table's column to fit as the loss, e.g. loss_NAME for an eval source"
  )
  p.add_argument(
    "--n-column", default="N", help="the column to fit as N: N (active parameters), N_all_experts, N_non_embedding..."
  )
  p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals (0: none)")
  p.add_argument("--window", type=float, default=0.0, help="approach 2: decades of N around each minimum (0: all)")
  p.add_argument("--grid-stride", type=int, default=1, help="approach 3: every K-th start of the 4,500-start grid")
  p.add_argument(
    "--flops-per-param-token", type=float, default=None, help="k in C = k N D for a table without a C column (6)"
  )


def _parse_predict(text: str | None):
  if text is None:
    return None
  try:
    n, d = (float(x) for x in text.split(","))
  except ValueError:
    raise UserError(f"--predict must be N,D (two numbers), got {text!r}") from None
  if not (n > 0 and d > 0):
    raise UserError(f"--predict needs positive N and D, got {text!r}")
  return n, d


def run(args, overrides: list[str]) -> int:
  """Runs a parsed `sweep`, `scaling` or `bench fit` command; prints its output."""
  if args.command == "sweep":
    from lm.scaling import sweep  # noqa: PLC0415

    if args.plan or args.topology:
      return _plan_sweep(args, overrides, sweep)
    if args.workdir is None:
      raise UserError("lm sweep: the following arguments are required: --workdir (unless --plan)")
    if args.print_commands:
      for line in sweep.commands(args.config, args.workdir, overrides):
        print(line)
      return 0
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.dist_timeout)
    path = sweep.run_sweep(args.config, args.workdir, overrides, progress=not args.no_progress)
    if not distributed.active() or distributed.process_id() == 0:
      print(f"results in {path}")
    return 0
  if overrides:
    raise UserError("--config.KEY=VALUE overrides apply only to lm train and lm sweep")
  from lm.scaling import fit  # noqa: PLC0415

  if args.command == "bench":
    print(json.dumps(fit.bench(args.table or DEFAULT_BENCH_TABLE)))
    return 0
  if args.bootstrap < 0 or args.grid_stride < 1:
    raise UserError("--bootstrap must be >= 0 and --grid-stride >= 1")
  if args.budget is not None and not args.budget > 0:
    raise UserError(f"--budget must be a positive number of FLOPs, got {args.budget}")
  with _warnings_to_stderr():
    return _run_scaling(args, fit)


def _plan_sweep(args, overrides: list[str], sweep) -> int:
  """Prints the `lm plan` table of every sweep point; raises UserError after it if any point does not fit."""
  from lm import plan  # noqa: PLC0415

  if not (args.plan and args.topology):
    raise UserError("lm sweep: --plan needs --topology, and --topology goes with --plan")
  if args.search:
    rows, compiles = sweep.search_points(args, overrides)
  else:
    rows, compiles = sweep.plan_points(args.config, args.topology, overrides, progress=not args.no_progress)
  print(plan.sweep_table(rows, args.topology, compiles))
  for point_id, report in rows if args.search else ():
    layout = plan_search.format_overrides(report["overrides"]) if "overrides" in report else "(no layout fits)"
    print(f"{point_id}: {layout}")
  too_big = [point_id for point_id, report in rows if not report["fits"]]
  if too_big:
    raise UserError(f"{len(too_big)} of {len(rows)} sweep points do not fit {args.topology}: {', '.join(too_big)}")
  return 0


@contextlib.contextmanager
def _warnings_to_stderr():
  """Prints the fits' warnings (e.g. a parabola vertex outside its budget's range) as one line each."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", UserWarning)
    yield
  for w in caught:
    print(f"lm: warning: {w.message}", file=sys.stderr)


def _run_scaling(args, fit) -> int:
  grid = fit.init_grid()[:: args.grid_stride]
  options = {"bootstrap": args.bootstrap, "window": args.window, "grid": grid, "budget": args.budget}
  if args.scaling_command == "fit":
    table, convention = fit.load_table(args.table, args.flops_per_param_token, args.loss_column, args.n_column)
    approaches = fit.APPROACHES if args.approach == "all" else (args.approach,)
    predict = _parse_predict(args.predict)
    result = fit.fit_table(table, approaches, predict=predict, convention=convention, **options)
    if args.out:
      fit.write_fit(result, args.out)
    print(json.dumps(result))
    return 0
  from lm.scaling import report  # noqa: PLC0415

  if args.scaling_command == "plot":
    table, convention = fit.load_table(args.table, args.flops_per_param_token, args.loss_column, args.n_column)
    result = fit.fit_table(table, convention=convention, keep_draws=True, **options)
    paths = report.figures(table, result, args.out, budget=args.budget)
    rows = report.read_rows(args.table)
    for column in report.downstream_columns(rows):
      paths += report.downstream_figure(rows, column, epath.Path(args.out))
    for path in paths:
      print(path)
    return 0
  report_md = report.write_report(
    args.workdir,
    flops_per_param_token=args.flops_per_param_token,
    loss_column=args.loss_column,
    n_column=args.n_column,
    **options,
  )
  print(report_md)
  return 0
