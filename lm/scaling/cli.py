"""Subcommands `lm sweep`, `lm scaling fit|plot|report` and `lm bench fit`, for `lm.cli` to mount.

lm sweep --config FILE --workdir DIR [--print-commands] [--config.KEY=VALUE ...]
lm scaling fit TABLE.csv [--approach 1|2|3|kaplan|all] [--predict N,D] [--budget C] [--bootstrap N] [--out DIR]
lm scaling plot TABLE.csv --out DIR [--budget C]
lm scaling report DIR [--budget C] [--bootstrap N]
lm bench fit [--table CSV]   (lm.cli parses `--table` and calls `run` with command "bench")
"""

import json

from lm.errors import UserError


def add_parsers(subparsers) -> None:
  """Adds the `sweep` and `scaling` subcommands to an argparse subparsers object."""
  p = subparsers.add_parser("sweep", help="run every point of an experiment's get_sweep(), one sub-workdir each")
  p.add_argument("--config", required=True, help="experiment file defining get_config() and get_sweep()")
  p.add_argument("--workdir", required=True, help="sweep directory: one sub-workdir per point, results.csv")
  p.add_argument("--print-commands", action="store_true", help="print one `lm train` command per point and exit")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")

  p = subparsers.add_parser("scaling", help="fit scaling laws, plot them, write a report")
  sub = p.add_subparsers(dest="scaling_command", required=True, parser_class=type(p))
  f = sub.add_parser("fit", help="fit a CSV table with columns N, D, loss (C optional)")
  f.add_argument("table")
  _add_fit_options(f)
  f.add_argument("--approach", default="all", choices=["1", "2", "3", "kaplan", "all"])
  f.add_argument("--predict", default=None, metavar="N,D", help="predicted loss at this (N, D)")
  f.add_argument("--out", default=None, help="also write fit.json into this directory")
  g = sub.add_parser("plot", help="the scaling figures of a table, as PNG and SVG")
  g.add_argument("table")
  g.add_argument("--out", required=True, help="output directory")
  _add_fit_options(g)
  r = sub.add_parser("report", help="fit a sweep's results.csv and write DIR/report/report.md with figures")
  r.add_argument("workdir")
  _add_fit_options(r)


def _add_fit_options(p) -> None:
  p.add_argument("--budget", type=float, default=None, help="compute budget C for the optimal allocation")
  p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
  p.add_argument("--window", type=float, default=0.0, help="approach 2: decades of N around each minimum (0: all)")
  p.add_argument("--grid-stride", type=int, default=1, help="approach 3: every K-th start of the 4,500 grid")
  p.add_argument("--flops-per-param-token", type=float, default=6.0, help="k in C = k N D when C is absent")


def _parse_predict(text: str | None):
  if text is None:
    return None
  try:
    n, d = (float(x) for x in text.split(","))
  except ValueError:
    raise UserError(f"--predict must be N,D (two numbers), got {text!r}") from None
  return n, d


def run(args, overrides: list[str]) -> int:
  """Runs a parsed `sweep`, `scaling` or `bench fit` command; prints its output."""
  from lm.scaling import fit  # noqa: PLC0415

  command = getattr(args, "command", None) or ("scaling" if hasattr(args, "scaling_command") else "sweep")
  if command == "sweep":
    from lm.scaling import sweep  # noqa: PLC0415

    if args.print_commands:
      for line in sweep.commands(args.config, args.workdir, overrides):
        print(line)
      return 0
    path = sweep.run_sweep(args.config, args.workdir, overrides, progress=not args.no_progress)
    print(f"results in {path}")
    return 0
  if command == "bench":
    print(json.dumps(fit.bench(args.table)))
    return 0
  if args.bootstrap < 0 or args.grid_stride < 1:
    raise UserError("--bootstrap must be >= 0 and --grid-stride >= 1")
  grid = fit.init_grid()[:: args.grid_stride]
  if args.scaling_command == "fit":
    table = fit.load_table(args.table, args.flops_per_param_token)
    approaches = fit.APPROACHES if args.approach == "all" else (args.approach,)
    result = fit.fit_table(
      table,
      approaches,
      budget=args.budget,
      predict=_parse_predict(args.predict),
      bootstrap=args.bootstrap,
      window=args.window,
      flops_per_param_token=args.flops_per_param_token,
      grid=grid,
    )
    if args.out:
      fit.write_fit(result, args.out)
    print(json.dumps(result))
    return 0
  from lm.scaling import report  # noqa: PLC0415

  if args.scaling_command == "plot":
    table = fit.load_table(args.table, args.flops_per_param_token)
    result = fit.fit_table(
      table, budget=args.budget, bootstrap=args.bootstrap, window=args.window, grid=grid, keep_draws=True
    )
    for path in report.figures(table, result, args.out, budget=args.budget):
      print(path)
    return 0
  print(report.write_report(args.workdir, args.budget, args.bootstrap, args.window, grid))
  return 0
