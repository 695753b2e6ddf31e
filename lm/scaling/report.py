"""Scaling figures (PNG and SVG) and the Markdown report of a fit.

Figures: IsoFLOP curves with their parabolas and minima; the compute-optimal frontier N_opt(C) and
D_opt(C) with fitted lines and bootstrap bands, extrapolated to a budget; Approach 3 loss contours with
IsoFLOP slices; residuals of the Approach 3 fit against compute; loss against FLOPs of every run.
"""

import csv
import json
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from lm.errors import UserError  # noqa: E402
from lm.scaling import fit as fit_lib  # noqa: E402


def _save(fig, out: epath.Path, name: str) -> list[str]:
  paths = []
  for ext in ("png", "svg"):
    path = out / f"{name}.{ext}"
    with path.open("wb") as f:
      fig.savefig(f, dpi=150, format=ext, bbox_inches="tight")  # keeps legends placed outside the axes
    paths.append(str(path))
  plt.close(fig)
  return paths


def isoflop_figure(table: dict, result: dict, out: epath.Path) -> list[str]:
  """Loss against N per budget (coloured by C), with each budget's parabola in log N and its minimum."""
  groups = fit_lib.group_budgets(table["C"])
  budgets = np.array([np.exp(np.mean(np.log(table["C"][groups == g]))) for g in range(groups.max() + 1)])
  norm = matplotlib.colors.LogNorm(budgets.min(), max(budgets.max(), budgets.min() * 1.01))
  fig, ax = plt.subplots(figsize=(7, 4.6))
  for g, budget in enumerate(budgets):
    idx = np.flatnonzero(groups == g)
    color = plt.cm.viridis(norm(budget))
    ax.scatter(table["N"][idx], table["loss"][idx], color=color, s=14, label="runs" if g == 0 else None)
    if len(idx) >= 3:
      x = np.log(table["N"][idx])
      coef = np.polyfit(x, table["loss"][idx], 2)
      xs = np.linspace(x.min(), x.max(), 100)
      label = "parabola in log N, per budget" if g == 0 else None
      ax.plot(np.exp(xs), np.polyval(coef, xs), color=color, lw=1, label=label)
  minima = result.get("approach2", {}).get("minima")
  if minima:
    ax.scatter(minima["N_opt"], minima["loss"], marker="*", s=110, color="red", zorder=3, label="parabola minima")
  fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="compute budget C (FLOPs)")
  ax.set_xscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title(f"IsoFLOP curves: {len(budgets)} budgets, {len(groups)} runs")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.13), ncol=3, frameon=False)
  fig.tight_layout()
  return _save(fig, out, "isoflop")


def _allocation(key: str, params: dict, cs, compute: dict) -> dict:
  if key == "approach3":
    return fit_lib.optimal_allocation(params, cs, compute)
  return fit_lib.power_allocation(params, cs)


def frontier_figure(table: dict, result: dict, out: epath.Path, budget: float | None) -> list[str]:
  """N_opt(C) and D_opt(C) of each approach with fitted lines and 95% bootstrap bands, extrapolated to `budget`."""
  compute = result["compute"]
  cs = np.logspace(np.log10(table["C"].min()), np.log10(max(budget or 0.0, table["C"].max())), 100)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  for ax, (name, label) in zip(axes, (("N_opt", "parameters N_opt"), ("D_opt", "training tokens D_opt")), strict=True):
    for i, key in enumerate(("approach1", "approach2", "approach3")):
      fit = result.get(key)
      if not fit or "error" in fit:
        continue
      exponent = fit["a"] if name == "N_opt" else fit["b"]
      line = _allocation(key, fit, cs, compute)[name]
      ax.plot(cs, line, color=f"C{i}", label=f"approach {key[-1]}: C^{exponent:.3f}")
      draws = fit.get("_draws")
      if draws:
        values = _allocation(key, {n: np.asarray(v)[:, None] for n, v in draws.items()}, cs[None], compute)[name]
        band = np.nanpercentile(values, [2.5, 97.5], axis=0)
        ax.fill_between(cs, band[0], band[1], color=f"C{i}", alpha=0.15, lw=0)
    minima = result.get("approach2", {}).get("minima")
    if minima:
      ax.scatter(minima["C"], minima[name], color="C1", s=16, zorder=3, label="approach 2 IsoFLOP minima")
    if budget:
      ax.axvline(budget, color="gray", ls="--", lw=1, label=f"budget C = {budget:.3g} FLOPs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"training compute C (FLOPs, {result['flops_convention']})")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.suptitle(f"compute-optimal allocation, C counted as {result['flops_convention']}; bands: 95% bootstrap intervals")
  fig.tight_layout()
  fig.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
  return _save(fig, out, "frontier")


def contour_figure(table: dict, result: dict, out: epath.Path) -> list[str]:
  """Approach 3 loss over (N, D) as filled contours, with IsoFLOP lines, the runs and the optimal frontier."""
  fit, compute = result["approach3"], result["compute"]
  ns = np.logspace(np.log10(table["N"].min()) - 0.5, np.log10(table["N"].max()) + 0.5, 200)
  ds = np.logspace(np.log10(table["D"].min()) - 0.5, np.log10(table["D"].max()) + 0.5, 200)
  nn, dd = np.meshgrid(ns, ds)
  loss = fit_lib.predict_loss(fit, nn, dd)
  fig, ax = plt.subplots(figsize=(7, 5.2))
  top = min(loss.max(), 1.5 * table["loss"].max())  # a degenerate fit can explode off the runs' region
  levels = np.geomspace(loss.min(), top, 21)
  filled = ax.contourf(nn, dd, loss, levels=levels, cmap="viridis", norm=matplotlib.colors.LogNorm(), extend="max")
  fig.colorbar(filled, ax=ax, label="predicted loss (nats/token)", format="%.3g")
  r_N = fit_lib.c_per_nd(compute, ns)  # C / (N D) at each N: C is the table's, as in every approach
  c_lo, c_hi = r_N[0] * ns[0] * ds[0], r_N[-1] * ns[-1] * ds[-1]
  exponents = np.arange(np.ceil(np.log10(c_lo)), np.log10(c_hi) + 1e-9)
  for c in exponents[:: max(1, len(exponents) // 6)]:
    ds_c = 10**c / (r_N * ns)
    ax.plot(ns, ds_c, color="white", lw=0.7, ls="--")
    inside = np.flatnonzero((ds_c > ds[0] * 1.5) & (ds_c < ds[-1] / 1.5))
    if len(inside):
      j = inside[len(inside) // 2]
      ax.annotate(f"1e{c:.0f}", (ns[j], ds_c[j]), color="white", fontsize=7, ha="left", va="bottom")
  frontier = fit_lib.optimal_allocation(fit, np.geomspace(c_lo, c_hi, 100), compute)
  ax.plot(frontier["N_opt"], frontier["D_opt"], color="red", lw=1.5, label="compute-optimal frontier")
  ax.scatter(table["N"], table["D"], s=6, color="black", label="runs")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(ns[0], ns[-1])
  ax.set_ylim(ds[0], ds[-1])
  ax.set_xlabel("parameters N")
  ax.set_ylabel("training tokens D")
  ax.set_title(f"Approach 3 fit; dashed: IsoFLOP lines, C as {result['flops_convention']} (FLOPs)")
  ax.legend(fontsize=8, loc="lower left")
  fig.tight_layout()
  return _save(fig, out, "contours")


def residual_figure(table: dict, result: dict, out: epath.Path) -> list[str]:
  """Relative residual of the Approach 3 fit, (observed - predicted) / predicted, against compute."""
  predicted = fit_lib.predict_loss(result["approach3"], table["N"], table["D"])
  fig, ax = plt.subplots(figsize=(6.4, 4))
  ax.scatter(table["C"], 100 * (table["loss"] - predicted) / predicted, s=10, label="runs")
  ax.axhline(0, color="black", lw=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("training compute C (FLOPs)")
  ax.set_ylabel("residual (% of predicted loss)")
  ax.set_title("Approach 3 residuals")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, out, "residuals")


def loss_flops_figure(curves: list[dict], out: epath.Path) -> list[str]:
  """Eval loss against training FLOPs for every run of a sweep (`curves.csv` rows), coloured by model size."""
  ids = sorted({r["id"] for r in curves})
  sizes = np.array([r["N"] for r in curves])
  norm = matplotlib.colors.LogNorm(sizes.min(), max(sizes.max(), sizes.min() * 1.01))
  fig, ax = plt.subplots(figsize=(7, 4.4))
  for run_id in ids:
    rows = [r for r in curves if r["id"] == run_id]
    color = plt.cm.viridis(norm(rows[0]["N"]))
    ax.plot([r["C"] for r in rows], [r["loss"] for r in rows], color=color, lw=1, marker="o", ms=2)
    ax.scatter(rows[-1]["C"], rows[-1]["loss"], color=color, s=16, zorder=3)
  fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="parameters N")
  ax.set_xscale("log")
  ax.set_xlabel("training compute C (FLOPs)")
  ax.set_ylabel("eval loss (nats/token)")
  ax.set_title(f"eval loss of {len(ids)} runs (large dot: final)")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  return _save(fig, out, "loss_vs_flops")


DOWNSTREAM_PREFIXES = ("acc_", "acc_norm_", "exact_match_")  # results.csv columns of downstream tasks


def downstream_columns(rows: list[dict]) -> list[str]:
  """The results.csv columns that hold a downstream metric (`lm eval --record`, `train.evals`) for some run."""
  names = dict.fromkeys(
    k for r in rows for k, v in r.items() if k.startswith(DOWNSTREAM_PREFIXES) and v not in ("", None)
  )
  return list(names)


def downstream_figure(rows: list[dict], column: str, out: epath.Path) -> list[str]:
  """A downstream metric against training compute (lines join the runs of one model size) and against eval
  loss, for the runs that have it."""
  out.mkdir(parents=True, exist_ok=True)
  have = [r for r in rows if r.get(column) not in ("", None)]
  c, n, loss, y = (np.array([float(r[k]) for r in have]) for k in ("C", "N", "loss", column))
  norm = matplotlib.colors.LogNorm(n.min(), max(n.max(), n.min() * 1.01))
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for size in sorted(set(n)):
    pick = np.flatnonzero(n == size)
    pick = pick[np.argsort(c[pick])]
    left.plot(c[pick], y[pick], color=plt.cm.viridis(norm(size)), marker="o", ms=4, lw=1)
  right.scatter(loss, y, c=plt.cm.viridis(norm(n)), s=20)
  fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=right, label="parameters N")
  left.set_xscale("log")
  left.set_xlabel("training compute C (FLOPs)")
  right.set_xlabel("eval loss (nats/token)")
  right.invert_xaxis()  # better models to the right in both panels
  left.set_ylabel(column)
  for ax in (left, right):
    ax.grid(True, which="both", alpha=0.3)
  fig.suptitle(f"{column} of {len(have)} runs")
  fig.tight_layout()
  return _save(fig, out, f"downstream_{column}")


def read_rows(path: str) -> list[dict]:
  with epath.Path(path).open() as f:
    return list(csv.DictReader(f))


def figures(table: dict, result: dict, out_dir: str, budget: float | None = None, curves=None) -> list[str]:
  """Every figure the fit supports, as PNG and SVG in `out_dir`; returns the paths."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = isoflop_figure(table, result, out) + frontier_figure(table, result, out, budget)
  if "approach3" in result:
    paths += contour_figure(table, result, out) + residual_figure(table, result, out)
  if curves:
    paths += loss_flops_figure(curves, out)
  return paths


def write_report(
  workdir: str,
  budget: float | None = None,
  bootstrap: int = 1000,
  window: float = 0.0,
  grid=None,
  flops_per_param_token: float | None = None,
  loss_column: str = "loss",
  n_column: str = "N",
) -> str:
  """Fits `workdir/results.csv` (its `loss_column`), writes `workdir/report/` (report.md, fit.json, figures).

  Returns report.md's path.
  """
  root = epath.Path(workdir)
  if not (root / "results.csv").exists():
    raise UserError(f"{workdir} has no results.csv; run `lm sweep` first")
  table, convention = fit_lib.load_table(str(root / "results.csv"), flops_per_param_token, loss_column, n_column)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = fit_lib.fit_table(
      table,
      budget=budget,
      bootstrap=bootstrap,
      window=window,
      convention=convention,
      grid=grid,
      keep_draws=True,
    )
  curves = fit_lib.read_curves(str(root / "curves.csv")) if (root / "curves.csv").exists() else None
  out = root / "report"
  paths = figures(table, result, str(out), budget, curves)
  rows = read_rows(str(root / "results.csv"))
  for column in downstream_columns(rows):
    paths += downstream_figure(rows, column, out)
  for fit in result.values():
    if isinstance(fit, dict):
      fit.pop("_draws", None)
  (out / "fit.json").write_text(json.dumps(result, indent=2))
  notes = [str(w.message) for w in caught]
  (out / "report.md").write_text(markdown(root.name, result, notes, paths, _compute_note(root / "results.csv")))
  return str(out / "report.md")


def _compute_note(results_csv: epath.Path) -> str:
  """What the runs stand for against what the sweep spent (they differ by what cooldown branches shared)."""
  with results_csv.open() as f:
    rows = list(csv.DictReader(f))
  if not rows or "C_spent" not in rows[0]:
    return ""
  stands_for, spent = sum(float(r["C"]) for r in rows), sum(float(r["C_spent"]) for r in rows)
  branches = sum("branch:" in r["flags"] for r in rows)
  return (
    f"Compute: the {len(rows)} runs stand for {stands_for!r} FLOPs; the sweep spent {spent!r} "
    f"({100 * (1 - spent / stands_for):.1f}% saved by {branches} cooldown branches)."
  )


_TITLES = {
  "approach1": "Approach 1: lower envelope of loss against compute",
  "approach2": "Approach 2: IsoFLOP parabolas",
  "approach3": "Approach 3: L(N, D) = E + A / N^alpha + B / D^beta",
  "kaplan": "Kaplan et al.: L = (X_c / X)^alpha_X",
}


def _cell(value) -> str:
  if isinstance(value, list):
    return "[" + ", ".join(repr(float(v)) for v in value) + "]"
  return repr(value)


def _convention_note(key: str, fit: dict) -> str:
  """The sentence above an approach's table saying under which C its exponents hold."""
  if key == "kaplan":
    return f"alpha_C and C_c: C counted as `{fit['flops_convention']}`."
  where = ""
  if "exponents_over_C" in fit:
    lo, hi = fit["exponents_over_C"]
    where = f", as slopes of log N_opt and log D_opt over C = {lo!r} to {hi!r} (C/(N D) varies with N)"
  return f"Exponents a and b and the allocation at the budget: C counted as `{fit['flops_convention']}`{where}."


def markdown(name: str, result: dict, caught: list[str], paths: list[str], compute_note: str = "") -> str:
  """The report page: every fitted number unrounded, with its 95% bootstrap interval, then the figures."""
  lines = [
    f"# Scaling-law report: {name}",
    "",
    f"{result['runs']} runs from `results.csv`. C is counted as `{result['flops_convention']}` in every "
    f"approach: Approaches 1 and 2 fit the table's C, and Approach 3's allocation (a, b, N_opt, D_opt) "
    f"minimises its loss at the same C, {result['compute_is']}. Intervals: 2.5 and 97.5 percentiles over "
    f"{result['bootstrap']} bootstrap resamples of the runs.",
  ]
  if compute_note:
    lines += ["", compute_note]
  lines += [f"- warning: {message}" for message in caught]
  for key, title in _TITLES.items():
    fit = result.get(key)
    if not fit:
      continue
    if "error" in fit:
      lines += ["", f"## {title}", "", f"Not fitted: {fit['error']}."]
      continue
    lines += ["", f"## {title}", "", _convention_note(key, fit), "", "| name | value | 95% interval |", "|---|---|---|"]
    for field, value in fit.items():
      if isinstance(value, float | int) and not isinstance(value, bool):
        interval = fit["ci95"].get(field)
        lines.append(f"| {field} | {_cell(value)} | {_cell(interval) if interval else ''} |")
    at = fit.get("at_budget")
    if at:
      for field in ("N_opt", "D_opt", "tokens_per_param", "loss"):
        if field in at:
          interval = at["ci95"].get(field)
          lines.append(f"| {field} at C = {at['C']!r} | {_cell(at[field])} | {_cell(interval) if interval else ''} |")
    if key == "approach2" and fit["vertex_outside_range"]:
      lines.append(f"\nBudgets whose parabola vertex lies outside the sampled N: {fit['vertex_outside_range']}")
  lines += ["", "## Figures", ""]
  for path in paths:
    if path.endswith(".png"):
      stem = epath.Path(path).stem
      lines += [f"![{stem}]({stem}.png)", f"({stem}.svg: vector version)", ""]
  return "\n".join(lines) + "\n"
