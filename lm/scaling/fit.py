"""Scaling-law fits of (N, D, loss) tables: Approaches 1, 2 and 3 of Hoffmann et al. and Kaplan power laws.

Approach 3 follows Hoffmann et al. (2022) as corrected by Besiroglu et al. (2024): L(N, D) = E + A/N^alpha
+ B/D^beta is fitted as log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b),
E = exp(e), minimising the SUM over runs of Huber(delta=1e-3) of the log residuals, in float64, with
L-BFGS from their 4,500-point grid of initialisations. The starts run as one vmapped batch of optax
L-BFGS; log N and log D are standardised inside the optimiser (an exact reparametrisation that only
improves conditioning) and results are mapped back. Bootstrap confidence intervals resample runs with
replacement: each resample is a vector of run weights, and all resamples are fitted as one batch.

The compute-optimal allocation assumes C = k N D (k = `flops_per_param_token`, 6 by default):
N_opt = G (C/k)^a and D_opt = (C/k)^b / G, with a = beta/(alpha+beta), b = alpha/(alpha+beta) and
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

import csv
import json
import math
import time
import warnings

import numpy as np

from lm.errors import UserError

PARAMETRIC = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3


def load_table(path: str, flops_per_param_token: float = 6.0) -> dict[str, np.ndarray]:
  """Columns `N`, `D`, `loss` (and `C`, or C = k N D) of a CSV file, as float64 arrays."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise UserError(f"cannot read table {path}: {e.strerror or e}") from e
  if not rows:
    raise UserError(f"{path} has no rows")
  missing = [c for c in ("N", "D", "loss") if c not in rows[0]]
  if missing:
    raise UserError(f"{path} lacks column(s) {', '.join(missing)}; needs N, D, loss (C optional)")
  table = {}
  for col in ("N", "D", "loss", "C"):
    if col not in rows[0]:
      continue
    try:
      table[col] = np.array([float(r[col]) for r in rows], np.float64)
    except ValueError as e:
      raise UserError(f"{path}: column {col} holds a non-number: {e}") from e
  for col, values in table.items():
    if not np.all(np.isfinite(values) & (values > 0)):
      raise UserError(f"{path}: column {col} must hold positive finite numbers")
  if "C" not in table:
    table["C"] = flops_per_param_token * table["N"] * table["D"]
  return table


def read_curves(path: str) -> list[dict]:
  """Rows of a sweep's `curves.csv` (id, N, D, C, loss), numbers as floats."""
  with open(path, newline="") as f:
    return [{k: v if k == "id" else float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def init_grid() -> np.ndarray:
  """The 4,500 initialisations (a, b, e, alpha, beta) of Hoffmann et al. / Besiroglu et al."""
  a = np.arange(0, 30, 5.0)
  e = np.arange(-1, 1.5, 0.5)
  exponent = np.arange(0, 2.5, 0.5)
  mesh = np.meshgrid(a, a, e, exponent, exponent, indexing="ij")
  return np.stack(mesh, -1).reshape(-1, 5)


def _standardise(log_n, log_d):
  return log_n.mean(), log_n.std(), log_d.mean(), log_d.std()


def _to_z(theta_Sx5, stats):
  mu_n, s_n, mu_d, s_d = stats
  a, b, e, alpha, beta = theta_Sx5.T
  return np.stack([a - alpha * mu_n, b - beta * mu_d, e, alpha * s_n, beta * s_d], -1)


def _from_z(z_Sx5, stats):
  mu_n, s_n, mu_d, s_d = stats
  a, b, e, alpha, beta = z_Sx5.T
  alpha, beta = alpha / s_n, beta / s_d
  return np.stack([a + alpha * mu_n, b + beta * mu_d, e, alpha, beta], -1)


def _objective(z, x_n, x_d, log_loss, weights, reduce: str):
  """Huber(delta) of log-sum-exp predictions of log loss, summed (or averaged) over weighted runs."""
  import jax.numpy as jnp  # noqa: PLC0415

  a, b, e, alpha, beta = z[0], z[1], z[2], z[3], z[4]
  t1, t2 = a - alpha * x_n, b - beta * x_d
  m = jnp.maximum(jnp.maximum(t1, t2), e)
  pred = m + jnp.log(jnp.exp(t1 - m) + jnp.exp(t2 - m) + jnp.exp(e - m))
  r = jnp.abs(pred - log_loss)
  huber = jnp.where(r < HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (r - 0.5 * HUBER_DELTA))
  total = jnp.sum(weights * huber)
  return total if reduce == "sum" else total / jnp.sum(weights)


def _lbfgs_batch(z0_Sx5, weights_SxR, x_n, x_d, log_loss, reduce, max_iter, tol, linesearch_steps):
  """Runs optax L-BFGS from every row of `z0`, each with its run weights; returns (z, objective, |grad|)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  linesearch = optax.scale_by_zoom_linesearch(max_linesearch_steps=linesearch_steps, initial_guess_strategy="one")
  opt = optax.lbfgs(memory_size=10, linesearch=linesearch)

  def solve(z0, weights):
    def f(z):
      return _objective(z, x_n, x_d, log_loss, weights, reduce)

    value_and_grad = optax.value_and_grad_from_state(f)

    def body(carry):
      z, state = carry
      value, grad = value_and_grad(z, state=state)
      updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=f)
      return optax.apply_updates(z, updates), state

    def running(carry):
      _, state = carry
      count, grad = optax.tree.get(state, "count"), optax.tree.get(state, "grad")
      return (count == 0) | ((count < max_iter) & (optax.tree.norm(grad) >= tol))

    z, _ = jax.lax.while_loop(running, body, (z0, opt.init(z0)))
    value, grad = jax.value_and_grad(f)(z)
    return z, value, jnp.linalg.norm(grad)

  return jax.jit(jax.vmap(solve))(jnp.asarray(z0_Sx5), jnp.asarray(weights_SxR))


def fit_parametric(
  n,
  d,
  loss,
  grid: np.ndarray | None = None,
  reduce: str = "sum",
  max_iter: int = 60,
  tol: float = 1e-8,
  linesearch_steps: int = 3,
  polish: int = 4,
  bootstrap: int = 0,
  seed: int = 0,
) -> dict:
  """Approach 3 on arrays N, D, loss: best parameters, objective, gradient norm, basin count, bootstrap draws.

  All starts of `grid` (default: the 4,500-point grid) run `max_iter` L-BFGS iterations as one batch;
  the `polish` best are then run to convergence (tol 1e-12), and the best of those is the fit.
  `reduce="mean"` and loose `tol`/`max_iter` exist to show what an under-converged fit looks like.
  """
  import jax  # noqa: PLC0415

  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
  stats = _standardise(log_n, log_d)
  x_n, x_d = (log_n - stats[0]) / stats[1], (log_d - stats[2]) / stats[3]
  grid = init_grid() if grid is None else np.asarray(grid, np.float64)
  start = time.perf_counter()
  with jax.enable_x64(True):
    ones_SxR = np.ones((len(grid), len(n)))
    z, value, _ = map(
      np.asarray,
      _lbfgs_batch(_to_z(grid, stats), ones_SxR, x_n, x_d, log_loss, reduce, max_iter, tol, linesearch_steps),
    )
    value = np.where(np.isfinite(value), value, np.inf)
    top = np.argsort(value)[: max(polish, 1)]
    if polish:
      z_top, v_top, g_top = map(
        np.asarray, _lbfgs_batch(z[top], ones_SxR[top], x_n, x_d, log_loss, reduce, 2000, 1e-12, 20)
      )
    else:
      z_top, v_top, g_top = z[top], value[top], np.full(len(top), np.nan)
    best = int(np.nanargmin(np.where(np.isfinite(v_top), v_top, np.inf)))
    z_best = z_top[best]
    theta_best = _from_z(z_best[None], stats)[0]
    theta_all = _from_z(z, stats)
    in_basin = np.all(np.abs(theta_all - theta_best) < 1e-2, axis=1) & np.isfinite(value)
    result = {
      **_named(theta_best),
      "objective": float(v_top[best]),
      "objective_reduce": reduce,
      "grad_norm": float(g_top[best]),
      "starts": len(grid),
      "starts_in_best_basin": int(in_basin.sum()),
      "starts_failed": int((~np.isfinite(value)).sum()),
      "fit_seconds": time.perf_counter() - start,
    }
    if bootstrap:
      rng = np.random.default_rng(seed)
      weights_BxR = rng.multinomial(len(n), np.full(len(n), 1.0 / len(n)), size=bootstrap).astype(np.float64)
      z0_Bx5 = np.broadcast_to(z_best, (bootstrap, 5))
      z_boot, v_boot, _ = map(np.asarray, _lbfgs_batch(z0_Bx5, weights_BxR, x_n, x_d, log_loss, reduce, 500, 1e-10, 10))
      theta_boot = _from_z(z_boot, stats)[np.isfinite(v_boot)]
      result["bootstrap"] = {k: v.tolist() for k, v in _named(theta_boot).items()}
  return result


def _named(theta):
  """{E, A, B, alpha, beta, a, b} of (a, b, e, alpha, beta) rows (or one row)."""
  theta = np.asarray(theta, np.float64)
  a_log, b_log, e, alpha, beta = (theta[..., i] for i in range(5))
  out = {"E": np.exp(e), "A": np.exp(a_log), "B": np.exp(b_log), "alpha": alpha, "beta": beta}
  out["a"], out["b"] = beta / (alpha + beta), alpha / (alpha + beta)
  return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


def predict_loss(params: dict, n, d):
  """L(N, D) = E + A/N^alpha + B/D^beta."""
  return params["E"] + params["A"] / np.power(n, params["alpha"]) + params["B"] / np.power(d, params["beta"])


def optimal_allocation(params: dict, budget, flops_per_param_token: float = 6.0) -> dict:
  """N_opt, D_opt, tokens per parameter and loss at compute `budget` (C = k N D) under the parametric law."""
  alpha, beta = np.asarray(params["alpha"]), np.asarray(params["beta"])
  g = (alpha * np.asarray(params["A"]) / (beta * np.asarray(params["B"]))) ** (1.0 / (alpha + beta))
  scaled = budget / flops_per_param_token
  n_opt = g * scaled ** (beta / (alpha + beta))
  d_opt = scaled ** (alpha / (alpha + beta)) / g
  return {
    "C": budget,
    "N_opt": n_opt,
    "D_opt": d_opt,
    "tokens_per_param": d_opt / n_opt,
    "loss": predict_loss(params, n_opt, d_opt),
  }


def power_law(x, y) -> tuple[float, float]:
  """(exponent, coefficient) of the least-squares line log y = exponent log x + log coefficient."""
  slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
  return float(slope), float(math.exp(intercept))


def group_budgets(c, tolerance: float = 0.2) -> np.ndarray:
  """Budget index of each run: sorted C values within a factor 1 + `tolerance` of a group's first share it."""
  order = np.argsort(c)
  groups, current, first = np.empty(len(c), int), -1, None
  for i in order:
    if first is None or c[i] > first * (1 + tolerance):
      current, first = current + 1, c[i]
    groups[i] = current
  return groups


def approach1(n, d, c, loss) -> dict:
  """Lower envelope of loss against compute (the runs no cheaper run beats), then N_opt, D_opt power laws."""
  order = np.argsort(c)
  best, frontier = np.inf, []
  for i in order:
    if loss[i] < best:
      best = loss[i]
      frontier.append(i)
  frontier = np.array(frontier)
  if len(frontier) < 2:
    raise UserError("approach 1 needs at least two runs on the loss-compute frontier")
  a, g_n = power_law(c[frontier], n[frontier])
  b, g_d = power_law(c[frontier], d[frontier])
  return {"a": a, "b": b, "N_coef": g_n, "D_coef": g_d, "frontier": frontier.tolist()}


def approach2(n, d, c, loss, window: float = 0.0, budget_tolerance: float = 0.2) -> dict:
  """Per-budget parabolas of loss in log N (within `window` decades of the lowest run; 0 = all), then power laws.

  Each vertex must lie inside its budget's sampled range of N; a warning names the budgets where it does not.
  D_opt comes from interpolating log D linearly in log N within the budget.
  """
  groups = group_budgets(c, budget_tolerance)
  minima, outside = [], []
  for g in range(groups.max() + 1):
    idx = np.flatnonzero(groups == g)
    if window:
      centre = np.log10(n[idx[np.argmin(loss[idx])]])
      idx = idx[np.abs(np.log10(n[idx]) - centre) <= window]
    if len(idx) < 3:
      continue
    x = np.log(n[idx])
    p2, p1, p0 = np.polyfit(x, loss[idx], 2)
    budget = float(np.exp(np.mean(np.log(c[idx]))))
    vertex = -p1 / (2 * p2) if p2 > 0 else np.nan
    if not (p2 > 0 and x.min() <= vertex <= x.max()):
      outside.append(budget)
      continue
    slope, intercept = np.polyfit(x, np.log(d[idx]), 1)
    minima.append((budget, math.exp(vertex), math.exp(intercept + slope * vertex), p0 + p1 * vertex + p2 * vertex**2))
  if outside:
    budgets = ", ".join(f"{b:.3g}" for b in outside)
    warnings.warn(
      f"approach 2: parabola vertex outside the sampled N range (or not a minimum) at C = {budgets}", stacklevel=2
    )
  if len(minima) < 2:
    raise UserError("approach 2 needs at least two budgets with three or more runs and a vertex inside the range")
  c_opt, n_opt, d_opt, l_opt = map(np.array, zip(*minima, strict=True))
  a, g_n = power_law(c_opt, n_opt)
  b, g_d = power_law(c_opt, d_opt)
  return {
    "a": a,
    "b": b,
    "N_coef": g_n,
    "D_coef": g_d,
    "minima": {"C": c_opt.tolist(), "N_opt": n_opt.tolist(), "D_opt": d_opt.tolist(), "loss": l_opt.tolist()},
    "vertex_outside_range": outside,
  }


def kaplan(n, d, c, loss) -> dict:
  """Kaplan et al. power laws L = (X_c / X)^alpha_X through the best loss at each N, each D and the compute frontier."""
  out = {}
  for name, x in (("N", n), ("D", d)):
    values = np.unique(x)
    if len(values) < 2:
      continue
    best = np.array([loss[x == v].min() for v in values])
    slope, coef = power_law(values, best)
    out[f"alpha_{name}"], out[f"{name}_c"] = -slope, coef ** (-1 / slope)
  frontier = approach1(n, d, c, loss)["frontier"]
  slope, coef = power_law(c[frontier], loss[frontier])
  out["alpha_C"], out["C_c"] = -slope, coef ** (-1 / slope)
  return out


APPROACHES = ("1", "2", "3", "kaplan")


def _power_allocation(fit: dict, budget: float) -> dict:
  n_opt, d_opt = fit["N_coef"] * budget ** fit["a"], fit["D_coef"] * budget ** fit["b"]
  return {"C": budget, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt}


def _fit_one(approach: str, t: dict, window: float, **kwargs) -> dict:
  n, d, c, loss = t["N"], t["D"], t["C"], t["loss"]
  if approach == "1":
    return approach1(n, d, c, loss)
  if approach == "2":
    return approach2(n, d, c, loss, window)
  if approach == "kaplan":
    return kaplan(n, d, c, loss)
  return fit_parametric(n, d, loss, **kwargs)


def _interval(draws) -> list[float]:
  draws = np.asarray(draws, np.float64)
  draws = draws[np.isfinite(draws)]
  return np.percentile(draws, [2.5, 97.5]).tolist() if len(draws) else [math.nan, math.nan]


def fit_table(
  table: dict,
  approaches=APPROACHES,
  budget: float | None = None,
  predict: tuple[float, float] | None = None,
  bootstrap: int = 1000,
  window: float = 0.0,
  flops_per_param_token: float = 6.0,
  seed: int = 0,
  grid: np.ndarray | None = None,
  keep_draws: bool = False,
) -> dict:
  """Fits every requested approach to a table; adds 95% bootstrap intervals, the allocation at `budget` and
  the predicted loss at `predict` = (N, D). Returns a JSON-ready dict keyed by approach (with the Approach 3
  bootstrap draws under `_draws` if `keep_draws`, for plotting bands)."""
  out = {"runs": len(table["N"]), "flops_per_param_token": flops_per_param_token, "bootstrap": bootstrap}
  rng = np.random.default_rng(seed)
  for approach in approaches:
    if approach not in APPROACHES:
      raise UserError(f"unknown approach {approach!r}; known: {', '.join(APPROACHES)}")
    if approach == "3":
      fit = fit_parametric(table["N"], table["D"], table["loss"], grid=grid, bootstrap=bootstrap, seed=seed)
      draws = fit.pop("bootstrap", {})
    else:
      fit = _fit_one(approach, table, window)
      draws = {}
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(bootstrap):
          idx = rng.integers(0, len(table["N"]), len(table["N"]))
          try:
            boot = _fit_one(approach, {k: v[idx] for k, v in table.items()}, window)
          except (UserError, np.linalg.LinAlgError, ValueError):
            continue
          for k, v in boot.items():
            if isinstance(v, float):
              draws.setdefault(k, []).append(v)
    fit["ci95"] = {k: _interval(v) for k, v in draws.items() if len(v)}
    if keep_draws and approach == "3":
      fit["_draws"] = draws
    if budget and approach != "kaplan":
      if approach == "3":
        fit["at_budget"] = {k: float(v) for k, v in optimal_allocation(fit, budget, flops_per_param_token).items()}
        boot_alloc = (
          optimal_allocation({k: np.asarray(draws[k]) for k in PARAMETRIC}, budget, flops_per_param_token)
          if draws
          else {}
        )
      else:
        fit["at_budget"] = _power_allocation(fit, budget)
        boot_alloc = {}
        if draws:
          boot_alloc = _power_allocation({k: np.asarray(draws[k]) for k in ("a", "b", "N_coef", "D_coef")}, budget)
      fit["at_budget"]["ci95"] = {
        k: _interval(boot_alloc[k]) for k in ("N_opt", "D_opt", "tokens_per_param") if k in boot_alloc
      }
    if predict and approach == "3":
      fit["predicted_loss"] = {"N": predict[0], "D": predict[1], "loss": float(predict_loss(fit, *predict))}
    out[f"approach{approach}" if approach != "kaplan" else "kaplan"] = fit
  return out


def write_fit(result: dict, out_dir: str) -> str:
  """Writes `fit.json` into `out_dir`; returns its path."""
  from etils import epath  # noqa: PLC0415

  path = epath.Path(out_dir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "fit.json").write_text(json.dumps(result, indent=2))
  return str(path / "fit.json")


def scipy_fit(n, d, loss, starts: np.ndarray) -> dict:
  """The reference: scipy L-BFGS-B from each start in a Python loop, as Besiroglu et al.'s code does."""
  from scipy.optimize import minimize  # noqa: PLC0415
  from scipy.special import huber  # noqa: PLC0415

  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)

  def objective(theta):
    a, b, e, alpha, beta = theta
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    return np.sum(huber(HUBER_DELTA, pred - log_loss))

  best, best_value = None, np.inf
  for start in starts:
    res = minimize(objective, start, method="L-BFGS-B")
    if res.fun < best_value:
      best, best_value = res.x, float(res.fun)
  return {**_named(best), "objective": best_value}


def bench(table_path: str, scipy_starts: int = 150) -> dict:
  """Seconds for the vectorised Approach 3 fit over the full grid vs a scipy loop (subsampled, extrapolated)."""
  t = load_table(table_path)
  vectorised = fit_parametric(t["N"], t["D"], t["loss"])
  grid = init_grid()
  sample = grid[np.random.default_rng(0).choice(len(grid), scipy_starts, replace=False)]
  start = time.perf_counter()
  reference = scipy_fit(t["N"], t["D"], t["loss"], sample)
  scipy_s = time.perf_counter() - start
  scipy_full_s = scipy_s * len(grid) / scipy_starts
  same = all(abs(vectorised[k] / reference[k] - 1) < 1e-3 for k in PARAMETRIC)
  return {
    "benchmark": "fit",
    "table": table_path,
    "starts": len(grid),
    "vectorised_s": round(vectorised["fit_seconds"], 2),
    "scipy_starts_timed": scipy_starts,
    "scipy_s_timed": round(scipy_s, 2),
    "scipy_s_full_grid_extrapolated": round(scipy_full_s, 1),
    "speedup": round(scipy_full_s / vectorised["fit_seconds"], 1),
    "objective_vectorised": vectorised["objective"],
    "objective_scipy": reference["objective"],
    "same_optimum": bool(same or vectorised["objective"] <= reference["objective"] * (1 + 1e-9)),
    "params_vectorised": {k: vectorised[k] for k in PARAMETRIC},
    "params_scipy": {k: reference[k] for k in PARAMETRIC},
  }
