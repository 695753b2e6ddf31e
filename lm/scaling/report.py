"""Scaling figures (PNG and SVG) and the Markdown report of a fit.

Figures: IsoFLOP curves with their parabolas and minima; the compute-optimal frontier N_opt(C) and
D_opt(C) with fitted lines and bootstrap bands, extrapolated to a budget; Approach 3 loss contours with
IsoFLOP slices; residuals of the Approach 3 fit against compute; loss against FLOPs of every run.
"""

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
      fig.savefig(f, dpi=150, format=ext)
    paths.append(str(path))
  plt.close(fig)
  return paths


def _budget_colors(n_groups: int):
  return plt.cm.viridis(np.linspace(0.0, 0.9, max(n_groups, 1)))


def isoflop_figure(table: dict, result: dict, out: epath.Path) -> list[str]:
  """Loss against N per budget, with each budget's parabola and its minimum."""
  groups = fit_lib.group_budgets(table["C"])
  colors = _budget_colors(groups.max() + 1)
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  for g in range(groups.max() + 1):
    idx = np.flatnonzero(groups == g)
    budget = np.exp(np.mean(np.log(table["C"][idx])))
    ax.scatter(table["N"][idx], table["loss"][idx], color=colors[g], s=18, label=f"C = {budget:.2g} FLOPs")
    if len(idx) >= 3:
      x = np.log(table["N"][idx])
      coef = np.polyfit(x, table["loss"][idx], 2)
      xs = np.linspace(x.min(), x.max(), 100)
      ax.plot(np.exp(xs), np.polyval(coef, xs), color=colors[g], lw=1)
  minima = result.get("approach2", {}).get("minima")
  if minima:
    ax.scatter(minima["N_opt"], minima["loss"], marker="*", s=120, color="black", zorder=3, label="parabola minima")
  ax.set_xscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("final loss (nats/token)")
  ax.set_title("IsoFLOP curves")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2 if groups.max() > 5 else 1)
  fig.tight_layout()
  return _save(fig, out, "isoflop")


def frontier_figure(table: dict, result: dict, out: epath.Path, budget: float | None) -> list[str]:
  """N_opt(C) and D_opt(C) of each approach with fitted lines and 95% bands, extrapolated to `budget`."""
  c_max = max(budget or 0.0, table["C"].max())
  cs = np.logspace(np.log10(table["C"].min()), np.log10(c_max), 100)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, (name, label) in zip(axes, (("N_opt", "parameters N_opt"), ("D_opt", "tokens D_opt")), strict=True):
    for i, key in enumerate(("approach1", "approach2", "approach3")):
      fit = result.get(key)
      if not fit:
        continue
      color = f"C{i}"
      if key == "approach3":
        line = fit_lib.optimal_allocation(fit, cs, result["flops_per_param_token"])[name]
        band = _parametric_band(fit, cs, name, result)
      else:
        coef, exponent = (fit["N_coef"], fit["a"]) if name == "N_opt" else (fit["D_coef"], fit["b"])
        line, band = coef * cs**exponent, None
      exponent = fit["a"] if name == "N_opt" else fit["b"]
      ax.plot(cs, line, color=color, label=f"approach {key[-1]}: exponent {exponent:.3f}")
      if band is not None:
        ax.fill_between(cs, band[0], band[1], color=color, alpha=0.2, lw=0)
    minima = result.get("approach2", {}).get("minima")
    if minima:
      ax.scatter(minima["C"], minima[name], color="C1", s=20, zorder=3, label="IsoFLOP minima")
    if budget:
      ax.axvline(budget, color="gray", ls="--", lw=1, label=f"budget {budget:.2g} FLOPs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("compute-optimal allocation (bands: 95% bootstrap)")
  fig.tight_layout()
  return _save(fig, out, "frontier")


def _parametric_band(fit: dict, cs, name: str, result: dict):
  draws = fit.get("_draws")
  if not draws:
    return None
  values = fit_lib.optimal_allocation({k: np.asarray(draws[k])[:, None] for k in fit_lib.PARAMETRIC}, cs[None])[name]
  return np.nanpercentile(values, [2.5, 97.5], axis=0)


def contour_figure(table: dict, result: dict, out: epath.Path) -> list[str]:
  """Approach 3 loss over (N, D) as contours, with IsoFLOP lines, the runs and the optimal frontier."""
  fit = result["approach3"]
  k = result["flops_per_param_token"]
  ns = np.logspace(np.log10(table["N"].min()) - 0.5, np.log10(table["N"].max()) + 0.5, 200)
  ds = np.logspace(np.log10(table["D"].min()) - 0.5, np.log10(table["D"].max()) + 0.5, 200)
  nn, dd = np.meshgrid(ns, ds)
  fig, ax = plt.subplots(figsize=(6.4, 5))
  cs = ax.contourf(nn, dd, np.log(fit_lib.predict_loss(fit, nn, dd)), levels=20, cmap="viridis")
  fig.colorbar(cs, ax=ax, label="log predicted loss")
  budgets = np.unique(np.round(np.log10(table["C"]) * 2) / 2)
  for c in budgets[:: max(1, len(budgets) // 6)]:
    ax.plot(ns, 10**c / (k * ns), color="white", lw=0.8, ls="--")
    ax.annotate(f"{10**c:.0e}", (ns[-1], 10**c / (k * ns[-1])), color="white", fontsize=7, ha="right", va="bottom")
  frontier = fit_lib.optimal_allocation(fit, k * nn.min() * dd.max() * np.logspace(-2, 2, 50), k)
  ax.plot(frontier["N_opt"], frontier["D_opt"], color="red", lw=1.5, label="compute-optimal frontier")
  ax.scatter(table["N"], table["D"], s=6, color="black", label="runs")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(ns[0], ns[-1])
  ax.set_ylim(ds[0], ds[-1])
  ax.set_xlabel("parameters N")
  ax.set_ylabel("training tokens D")
  ax.set_title("Approach 3 fit: dashed lines are IsoFLOP slices (FLOPs)")
  ax.legend(fontsize=7, loc="lower left")
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
  """Eval loss against training FLOPs for every run of a sweep (`curves.csv` rows)."""
  ids = sorted({r["id"] for r in curves})
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, run_id in enumerate(ids):
    rows = [r for r in curves if r["id"] == run_id]
    ax.plot([r["C"] for r in rows], [r["loss"] for r in rows], color=plt.cm.viridis(i / max(len(ids) - 1, 1)), lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("training compute (FLOPs)")
  ax.set_ylabel("eval loss (nats/token)")
  ax.set_title(f"eval loss of {len(ids)} runs")
  ax.grid(True, which="both", alpha=0.3)
  sm = plt.cm.ScalarMappable(cmap="viridis")
  fig.colorbar(sm, ax=ax, label="run (in id order)", ticks=[])
  fig.tight_layout()
  return _save(fig, out, "loss_vs_flops")


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
  workdir: str, budget: float | None = None, bootstrap: int = 1000, window: float = 0.0, grid=None
) -> str:
  """Fits `workdir/results.csv`, writes `workdir/report/` (report.md, fit.json, figures); returns report.md."""
  root = epath.Path(workdir)
  if not (root / "results.csv").exists():
    raise UserError(f"{workdir} has no results.csv; run `lm sweep` first")
  table = fit_lib.load_table(str(root / "results.csv"))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = fit_lib.fit_table(table, budget=budget, bootstrap=bootstrap, window=window, grid=grid, keep_draws=True)
  curves = fit_lib.read_curves(str(root / "curves.csv")) if (root / "curves.csv").exists() else None
  out = root / "report"
  paths = figures(table, result, str(out), budget, curves)
  for fit in result.values():
    if isinstance(fit, dict):
      fit.pop("_draws", None)
  (out / "fit.json").write_text(json.dumps(result, indent=2))
  lines = [f"# Scaling-law report: {root.name}", "", f"{result['runs']} runs from `results.csv`; C as logged."]
  lines += [f"- warning: {w.message}" for w in caught]
  for key, fit in result.items():
    if not isinstance(fit, dict):
      continue
    lines += ["", f"## {key}", "", "| name | value | 95% interval |", "|---|---|---|"]
    for name, value in fit.items():
      if isinstance(value, float | int) and not isinstance(value, bool):
        lines.append(f"| {name} | {value!r} | {fit.get('ci95', {}).get(name, '')} |")
    if "at_budget" in fit:
      at = fit["at_budget"]
      for name in ("N_opt", "D_opt", "tokens_per_param"):
        lines.append(f"| {name} at C={at['C']!r} | {at[name]!r} | {at['ci95'].get(name, '')} |")
  lines += ["", "## Figures", ""]
  lines += [f"![{epath.Path(p).stem}]({epath.Path(p).name})" for p in paths if p.endswith(".png")]
  (out / "report.md").write_text("\n".join(lines) + "\n")
  return str(out / "report.md")
