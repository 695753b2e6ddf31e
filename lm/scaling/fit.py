"""Scaling-law fits of (N, D, loss) tables: Approaches 1, 2 and 3 of Hoffmann et al. and Kaplan power laws.

Approach 3 follows Hoffmann et al. (2022) as corrected by Besiroglu et al. (2024): L(N, D) = E + A/N^alpha
+ B/D^beta is fitted as log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b),
E = exp(e), minimising the SUM over runs of Huber(delta=1e-3) of the log residuals, in float64, with
L-BFGS from their 4,500-point grid of initialisations. All starts run as one batch: a lockstep L-BFGS
over arrays of shape (starts, runs) with an analytic gradient, jitted, so that a step costs one pass over
the batch (a `vmap` of optax's L-BFGS evaluates both branches of its line search's conditionals for every
start, about seven gradients per step). log N and log D are standardised inside the optimiser (an exact
reparametrisation that only improves conditioning) and results are mapped back. Bootstrap confidence
intervals resample runs with replacement: each resample is a vector of run weights, and all resamples are
fitted as one batch from the best fit.

One FLOP convention per table: every approach uses the table's own C, the one its `flops_convention`
column names. Approaches 1, 2 and Kaplan's fit C directly; Approach 3's compute-optimal allocation
minimises L(N, D) subject to the same C. C is not refitted as 6 N D instead because a sweep's IsoFLOP
budgets were planned under the table's C: recounted as 6 N D, one budget's runs would differ in C by
the attention share (a third or more at small N), so Approach 2's parabolas would no longer lie on
IsoFLOP slices and the exponents would describe runs that were not trained. The allocation is therefore
derived under the compute the runs really cost (by the table's convention):
- When C = k N D for one k (a table without C, where k is `flops_per_param_token`, 6 by default, or a C
  column like Chinchilla's that is exactly 6 N D), the closed form holds: N_opt = G (C/k)^a and
  D_opt = (C/k)^b / G, with a = beta/(alpha+beta), b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta)).
- Otherwise (e.g. C = 6 N D + 12 L T d_model D), C = r(N) N D, with r(N) the table's C / (N D) at its
  model sizes, interpolated in log N (cubic Hermite) and held at its end values beyond them, which
  slightly overstates C for larger models, whose attention share is smaller. N_opt(C) minimises
  L(N, C / (N r(N))) over N numerically, D_opt = C / (N_opt r(N_opt)), and a and b are the least-squares
  slopes of log N_opt and log D_opt against log C over the table's range of C (then a + b need not be 1).
"""

import csv
import functools
import json
import math
import time
import warnings

import numpy as np
from etils import epath

from lm.errors import UserError

PARAMETRIC = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3


def load_table(
  path: str, flops_per_param_token: float | None = None, loss_column: str = "loss", n_column: str = "N"
) -> tuple[dict[str, np.ndarray], str]:
  """Columns `N`, `D`, `loss` and `C` of a CSV file as float64 arrays, and the FLOP convention of C.

  `loss` is read from `loss_column`: another eval set's loss in a sweep's results.csv (`loss_NAME`),
  or `best_eval_loss`. `N` is read from `n_column`: a sweep's `N` is a mixture of experts' active
  parameters, `N_all_experts` counts every expert.

  C comes from the table, or else is k N D with k = `flops_per_param_token` (6 by default), which a table
  with a C column rejects. The convention is the table's `flops_convention` column (as `lm sweep` writes it;
  one value for the whole table), "as given" for a C column without one, or "C = k N D".
  """
  try:
    with epath.Path(path).open() as f:  # a local path or gs://
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise UserError(f"cannot read table {path}: {e.strerror or e}") from e
  if not rows:
    raise UserError(f"{path} has no rows")
  missing = [c for c in (n_column, "D", loss_column) if c not in rows[0]]
  if missing:
    raise UserError(f"{path} lacks column(s) {', '.join(missing)}; needs {n_column}, D, {loss_column} (C optional)")
  table = {}
  for col, source in (("N", n_column), ("D", "D"), ("loss", loss_column), ("C", "C")):
    if source not in rows[0]:
      continue
    try:
      table[col] = np.array([float(r[source]) for r in rows], np.float64)
    except ValueError as e:
      raise UserError(f"{path}: column {source} holds a non-number: {e}") from e
  for col, values in table.items():
    if not np.all(np.isfinite(values) & (values > 0)):
      raise UserError(f"{path}: column {col} must hold positive finite numbers")
  if "C" not in table:
    k = 6.0 if flops_per_param_token is None else flops_per_param_token
    table["C"] = k * table["N"] * table["D"]
    return table, f"C = {k:g} N D"
  if flops_per_param_token is not None:
    raise UserError(f"{path} has a C column; --flops-per-param-token applies only to tables without one")
  if "flops_convention" not in rows[0]:
    return table, "as given"
  conventions = sorted({r["flops_convention"] for r in rows})
  if len(conventions) > 1:
    raise UserError(f"{path} mixes FLOP conventions ({', '.join(conventions)}); fit one convention per table")
  return table, conventions[0]


def compute_model(n, d, c, rtol: float = 1e-6) -> dict:
  """How a table's C depends on N and D, JSON-ready: {"C_per_ND": k} when C = k N D for one k (to `rtol`),
  else {"N": the sizes, "C_per_ND": C / (N D) at each (geometric mean over its runs)}, for `c_per_nd`."""
  log_ratio = np.log(c / (n * d))
  if np.ptp(log_ratio) <= rtol:
    return {"C_per_ND": float(np.exp(log_ratio.mean()))}
  sizes, which = np.unique(n, return_inverse=True)
  mean_log_ratio = np.bincount(which, log_ratio) / np.bincount(which)
  return {"N": sizes.tolist(), "C_per_ND": np.exp(mean_log_ratio).tolist()}


def describe_compute(compute: dict) -> str:
  """One line saying how C is computed from N and D under a `compute_model`."""
  if "N" not in compute:
    return f"C = {compute['C_per_ND']:.6g} N D"
  n, r = compute["N"], compute["C_per_ND"]
  return (
    f"C = r(N) N D, r = the table's C/(N D) at its {len(n)} sizes ({r[0]:.4g} at N = {n[0]:.3g} to {r[-1]:.4g} "
    f"at N = {n[-1]:.3g}), interpolated in log N and held at the end values beyond them"
  )


def _hermite(x_K, y_K, x):
  """Cubic Hermite interpolant through the knots (x_K ascending, y_K) at x, constant beyond the end knots.

  Knot slopes are the distance-weighted means of the neighbouring secants (the secant at the ends): the
  curve passes through every knot with a continuous first derivative, so minima found along it move smoothly.
  """
  if len(x_K) == 1:
    return np.full(np.shape(x), y_K[0])
  x = np.clip(x, x_K[0], x_K[-1])
  h_K, secant_K = np.diff(x_K), np.diff(y_K) / np.diff(x_K)
  slope_K = np.concatenate(
    [secant_K[:1], (secant_K[:-1] * h_K[1:] + secant_K[1:] * h_K[:-1]) / (h_K[:-1] + h_K[1:]), secant_K[-1:]]
  )
  i = np.clip(np.searchsorted(x_K, x, side="right") - 1, 0, len(h_K) - 1)
  h = h_K[i]
  t = (x - x_K[i]) / h
  return (
    (1 + 2 * t) * (1 - t) ** 2 * y_K[i]
    + t * (1 - t) ** 2 * h * slope_K[i]
    + t**2 * (3 - 2 * t) * y_K[i + 1]
    + t**2 * (t - 1) * h * slope_K[i + 1]
  )


def c_per_nd(compute: dict, n):
  """C / (N D) at sizes `n` under a `compute_model`: its k, or its sizes' values interpolated in log N."""
  if "N" not in compute:
    return np.full(np.shape(n), compute["C_per_ND"])
  return np.exp(_hermite(np.log(compute["N"]), np.log(compute["C_per_ND"]), np.log(n)))


def read_curves(path: str) -> list[dict]:
  """Rows of a sweep's `curves.csv` (id, N, D, C, loss), numbers as floats."""
  with epath.Path(path).open() as f:
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


def _objective_terms(z_Sx5, data, weights_SxR):
  """Per start: the weighted sum of Huber(delta) of log-sum-exp predictions of log loss, and what its gradient needs."""
  import jax.numpy as jnp  # noqa: PLC0415

  x_n, x_d, log_loss = data
  a, b, e, alpha, beta = (z_Sx5[:, i : i + 1] for i in range(5))
  t1_SxR, t2_SxR = a - alpha * x_n, b - beta * x_d
  m_SxR = jnp.maximum(jnp.maximum(t1_SxR, t2_SxR), e)
  e1_SxR, e2_SxR, e3_SxR = jnp.exp(t1_SxR - m_SxR), jnp.exp(t2_SxR - m_SxR), jnp.exp(e - m_SxR)
  sum_SxR = e1_SxR + e2_SxR + e3_SxR
  r_SxR = m_SxR + jnp.log(sum_SxR) - log_loss
  abs_SxR = jnp.abs(r_SxR)
  q_SxR = jnp.minimum(abs_SxR, HUBER_DELTA)  # Huber = q (|r| - q/2): a select costs 3x on XLA's CPU backend
  value_S = jnp.sum(weights_SxR * q_SxR * (abs_SxR - 0.5 * q_SxR), 1)
  return value_S, (r_SxR, sum_SxR, e1_SxR, e2_SxR, e3_SxR)


def _value(z_Sx5, data, weights_SxR, reduce):
  value_S, _ = _objective_terms(z_Sx5, data, weights_SxR)
  return value_S if reduce == "sum" else value_S / weights_SxR.sum(1)


def _value_and_grad(z_Sx5, data, weights_SxR, reduce):
  """Objective and its analytic gradient per start (autodiff of the log-sum-exp costs about twice as much)."""
  import jax.numpy as jnp  # noqa: PLC0415

  x_n, x_d, _ = data
  value_S, (r_SxR, sum_SxR, e1_SxR, e2_SxR, e3_SxR) = _objective_terms(z_Sx5, data, weights_SxR)
  slope_SxR = weights_SxR * jnp.clip(r_SxR, -HUBER_DELTA, HUBER_DELTA) / sum_SxR
  g1_SxR, g2_SxR = slope_SxR * e1_SxR, slope_SxR * e2_SxR
  grad_Sx5 = jnp.stack(
    [g1_SxR.sum(1), g2_SxR.sum(1), (slope_SxR * e3_SxR).sum(1), -(g1_SxR * x_n).sum(1), -(g2_SxR * x_d).sum(1)], 1
  )
  if reduce == "mean":
    total_S = weights_SxR.sum(1)
    return value_S / total_S, grad_Sx5 / total_S[:, None]
  return value_S, grad_Sx5


def _lbfgs_direction(g_Sx5, s_SxMx5, y_SxMx5, rho_SxM):
  """-H g by the two-loop recursion over each start's memory (slot 0 newest; empty slots have rho = 0)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  memory = (s_SxMx5.swapaxes(0, 1), y_SxMx5.swapaxes(0, 1), rho_SxM.T)

  def newest_first(q_Sx5, pair):
    s_Sx5, y_Sx5, rho_S = pair
    alpha_S = rho_S * jnp.sum(s_Sx5 * q_Sx5, 1)
    return q_Sx5 - alpha_S[:, None] * y_Sx5, alpha_S

  def oldest_first(r_Sx5, pair_and_alpha):
    (s_Sx5, y_Sx5, rho_S), alpha_S = pair_and_alpha
    beta_S = rho_S * jnp.sum(y_Sx5 * r_Sx5, 1)
    return r_Sx5 + (alpha_S - beta_S)[:, None] * s_Sx5, None

  q_Sx5, alpha_MxS = jax.lax.scan(newest_first, g_Sx5, memory)
  has_memory = rho_SxM[:, 0] > 0
  yy_S = jnp.sum(y_SxMx5[:, 0] ** 2, 1)
  # Initial inverse Hessian s'y / y'y; without memory, a step of at most unit length along -g.
  gamma_S = jnp.where(
    has_memory,
    1.0 / jnp.where(has_memory, rho_SxM[:, 0] * yy_S, 1.0),
    1.0 / jnp.maximum(jnp.linalg.norm(g_Sx5, axis=1), 1.0),
  )
  r_Sx5, _ = jax.lax.scan(oldest_first, gamma_S[:, None] * q_Sx5, (memory, alpha_MxS), reverse=True)
  return -r_Sx5


def _lbfgs(z0_Sx5, data, weights_SxR, reduce: str, max_iter: int, tol: float, memory: int = 10, backtracks: int = 2):
  """L-BFGS from every row of `z0` at once, in lockstep: each iteration takes one batched gradient.

  Each start tries its step size t (1 after a successful step) and halves it up to `backtracks` times until
  the Armijo condition holds; one that still fails keeps halving in the next iterations, so a slow start
  does not hold the batch back. Once t falls below 2^-30, its memory is dropped (the next step goes along
  -g). A start stops when its gradient norm is below `tol`, when a step gains less than 1e-15 of the
  objective, or when even -g gives no decrease: it sits at the optimum to float64 precision.
  Returns (z, objective, |gradient|, iterations).
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  starts = z0_Sx5.shape[0]

  def step(carry):
    z_Sx5, f_S, g_Sx5, s_SxMx5, y_SxMx5, rho_SxM, t_S, done_S, it = carry
    d_Sx5 = _lbfgs_direction(g_Sx5, s_SxMx5, y_SxMx5, rho_SxM)
    uphill_S = ~(jnp.sum(d_Sx5 * g_Sx5, 1) < 0)  # a bad memory: forget it and go along -g
    d_Sx5 = jnp.where(uphill_S[:, None], -g_Sx5 / jnp.maximum(jnp.linalg.norm(g_Sx5, axis=1), 1.0)[:, None], d_Sx5)
    s_SxMx5, y_SxMx5 = (jnp.where(uphill_S[:, None, None], 0.0, m) for m in (s_SxMx5, y_SxMx5))
    rho_SxM = jnp.where(uphill_S[:, None], 0.0, rho_SxM)
    slope_S = jnp.sum(d_Sx5 * g_Sx5, 1)

    def armijo(t_S):
      f_new_S = _value(z_Sx5 + t_S[:, None] * d_Sx5, data, weights_SxR, reduce)
      return (f_new_S <= f_S + 1e-4 * t_S * slope_S) & (f_new_S < f_S)  # strict: no endless steps below rounding

    def halve(search):
      t_S, ok_S, k = search
      t_S = jnp.where(ok_S, t_S, 0.5 * t_S)
      return t_S, ok_S | armijo(t_S), k + 1

    def searching(search):
      _, ok_S, k = search
      return (k < backtracks) & jnp.any(~ok_S & ~done_S)

    t_S = jnp.where(uphill_S, 1.0, t_S)
    t_S, ok_S, _ = jax.lax.while_loop(searching, halve, (t_S, armijo(t_S), 0))
    move_S = ok_S & ~done_S
    z_new_Sx5 = jnp.where(move_S[:, None], z_Sx5 + t_S[:, None] * d_Sx5, z_Sx5)
    f_new_S, g_new_Sx5 = _value_and_grad(z_new_Sx5, data, weights_SxR, reduce)
    s_Sx5, y_Sx5 = z_new_Sx5 - z_Sx5, g_new_Sx5 - g_Sx5
    sy_S = jnp.sum(s_Sx5 * y_Sx5, 1)
    push_S = move_S & (sy_S > 1e-10 * jnp.linalg.norm(s_Sx5, axis=1) * jnp.linalg.norm(y_Sx5, axis=1))
    s_SxMx5 = jnp.where(push_S[:, None, None], jnp.concatenate([s_Sx5[:, None], s_SxMx5[:, :-1]], 1), s_SxMx5)
    y_SxMx5 = jnp.where(push_S[:, None, None], jnp.concatenate([y_Sx5[:, None], y_SxMx5[:, :-1]], 1), y_SxMx5)
    rho_new_S = 1.0 / jnp.where(push_S, sy_S, 1.0)
    rho_SxM = jnp.where(push_S[:, None], jnp.concatenate([rho_new_S[:, None], rho_SxM[:, :-1]], 1), rho_SxM)
    t_S = jnp.where(move_S, 1.0, 0.5 * t_S)
    exhausted_S = ~move_S & (t_S < 2.0**-30)
    stalled_S = move_S & (f_S - f_new_S <= 1e-15 * jnp.abs(f_S))  # gains of a few ulps: converged in float64
    converged_S = (jnp.linalg.norm(g_new_Sx5, axis=1) < tol) | stalled_S | (exhausted_S & (rho_SxM[:, 0] == 0))
    done_S = done_S | converged_S
    s_SxMx5, y_SxMx5 = (jnp.where(exhausted_S[:, None, None], 0.0, m) for m in (s_SxMx5, y_SxMx5))
    rho_SxM = jnp.where(exhausted_S[:, None], 0.0, rho_SxM)
    t_S = jnp.where(exhausted_S, 1.0, t_S)
    return z_new_Sx5, f_new_S, g_new_Sx5, s_SxMx5, y_SxMx5, rho_SxM, t_S, done_S, it + 1

  def running(carry):
    return (carry[-1] < max_iter) & ~jnp.all(carry[-2])

  f_S, g_Sx5 = _value_and_grad(z0_Sx5, data, weights_SxR, reduce)
  empty_SxMx5 = jnp.zeros((starts, memory, 5), z0_Sx5.dtype)
  carry = (z0_Sx5, f_S, g_Sx5, empty_SxMx5, empty_SxMx5, jnp.zeros((starts, memory), z0_Sx5.dtype))
  carry += (jnp.ones(starts, z0_Sx5.dtype), jnp.linalg.norm(g_Sx5, axis=1) < tol, 0)
  z_Sx5, f_S, g_Sx5, *_, iterations = jax.lax.while_loop(running, step, carry)
  return z_Sx5, f_S, jnp.linalg.norm(g_Sx5, axis=1), iterations


@functools.cache
def _jitted_lbfgs():
  import jax  # noqa: PLC0415

  return jax.jit(_lbfgs, static_argnames=("reduce",))


def _solve(z0_Sx5, data, weights_SxR, reduce: str, max_iter: int, tol: float) -> tuple[np.ndarray, ...]:
  """`_lbfgs`, jitted, in float64; NaN objectives become inf. Returns numpy (z, objective, |gradient|, iterations).

  The batch is padded to a multiple of 256 starts (copies of the first), so that batches of similar size,
  such as the polish and a small bootstrap, share one compiled program.
  """
  import jax  # noqa: PLC0415

  starts = len(z0_Sx5)
  pad = -starts % 256
  z0_Px5 = np.concatenate([z0_Sx5, np.repeat(z0_Sx5[:1], pad, 0)]).astype(np.float64)
  weights_PxR = np.concatenate([weights_SxR, np.repeat(weights_SxR[:1], pad, 0)]).astype(np.float64)
  with jax.enable_x64(True):
    z, value, grad_norm, iterations = jax.device_get(
      _jitted_lbfgs()(z0_Px5, data, weights_PxR, reduce=reduce, max_iter=max_iter, tol=tol)
    )
  return z[:starts], np.where(np.isfinite(value), value, np.inf)[:starts], grad_norm[:starts], int(iterations)


def fit_parametric(
  n,
  d,
  loss,
  grid: np.ndarray | None = None,
  reduce: str = "sum",
  max_iter: int = 60,
  tol: float = 1e-8,
  polish: int = 4,
  bootstrap: int = 0,
  seed: int = 0,
) -> dict:
  """Approach 3 on arrays N, D, loss: best parameters, objective, gradient norm, basin count, bootstrap draws.

  All starts of `grid` (default: the 4,500-point grid) run `max_iter` L-BFGS iterations as one batch; the
  `polish` best then run to convergence (|gradient| < 1e-12 or no further decrease), and the best of those
  is the fit. `starts_in_best_basin` counts the starts within 0.01 of the best (a, b, e, alpha, beta) after
  the batch. `reduce="mean"` and a loose `tol`/`max_iter` show what an under-converged fit looks like.
  """
  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
  stats = _standardise(log_n, log_d)
  data = ((log_n - stats[0]) / stats[1], (log_d - stats[2]) / stats[3], log_loss)
  grid = init_grid() if grid is None else np.asarray(grid, np.float64)
  ones_SxR = np.ones((len(grid), len(n)))
  start = time.perf_counter()
  z, value, grad_norm, iterations = _solve(_to_z(grid, stats), data, ones_SxR, reduce, max_iter, tol)
  top = np.argsort(value)[: max(polish, 1)]
  if polish:
    z_top, v_top, g_top, _ = _solve(z[top], data, ones_SxR[top], reduce, 5000, 1e-12)
  else:
    z_top, v_top, g_top = z[top], value[top], grad_norm[top]
  best = int(np.argmin(v_top))
  theta_best = _from_z(z_top[best][None], stats)[0]
  in_basin = np.all(np.abs(_from_z(z, stats) - theta_best) < 1e-2, axis=1) & np.isfinite(value)
  result = {
    **_named(theta_best),
    "objective": float(v_top[best]),
    "objective_reduce": reduce,
    "grad_norm": float(g_top[best]),
    "starts": len(grid),
    "batch_iterations": iterations,
    "starts_in_best_basin": int(in_basin.sum()),
    "starts_failed": int((~np.isfinite(value)).sum()),
    "fit_seconds": time.perf_counter() - start,
  }
  if bootstrap:
    rng = np.random.default_rng(seed)
    weights_BxR = rng.multinomial(len(n), np.full(len(n), 1.0 / len(n)), size=bootstrap).astype(np.float64)
    z0_Bx5 = np.broadcast_to(z_top[best], (bootstrap, 5))
    z_boot, v_boot, _, _ = _solve(z0_Bx5, data, weights_BxR, reduce, 1000, 1e-10)
    draws = _named(_from_z(z_boot, stats))
    finite = np.isfinite(v_boot) & np.all([np.isfinite(v) for v in draws.values()], axis=0)
    result["bootstrap_failed"] = int((~finite).sum())
    result["bootstrap"] = {k: v[finite] for k, v in draws.items()}
  return result


def _named(theta):
  """{E, A, B, alpha, beta, a, b} of (a, b, e, alpha, beta) rows (or one row)."""
  theta = np.asarray(theta, np.float64)
  a_log, b_log, e, alpha, beta = (theta[..., i] for i in range(5))
  with np.errstate(over="ignore"):  # a bootstrap draw can run off to infinity; callers drop non-finite draws
    out = {"E": np.exp(e), "A": np.exp(a_log), "B": np.exp(b_log), "alpha": alpha, "beta": beta}
  out["a"], out["b"] = beta / (alpha + beta), alpha / (alpha + beta)
  return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


def predict_loss(params: dict, n, d):
  """L(N, D) = E + A/N^alpha + B/D^beta."""
  return params["E"] + params["A"] / np.power(n, params["alpha"]) + params["B"] / np.power(d, params["beta"])


SIX_ND = {"C_per_ND": 6.0}


def optimal_allocation(params: dict, budget, compute: dict = SIX_ND) -> dict:
  """N_opt, D_opt, tokens per parameter and loss at compute `budget` under the parametric law and a
  `compute_model` (default C = 6 N D): in closed form when C = k N D, else by `_optimal_size`.

  Parameters may be arrays (bootstrap draws); a draw with alpha or beta <= 0 has no optimum and gives NaN.
  """
  alpha, beta = np.asarray(params["alpha"]), np.asarray(params["beta"])
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    if "N" in compute:
      n_opt = _optimal_size(params, budget, compute)
      d_opt = budget / (n_opt * c_per_nd(compute, n_opt))
    else:
      g = (alpha * np.asarray(params["A"]) / (beta * np.asarray(params["B"]))) ** (1.0 / (alpha + beta))
      scaled = budget / compute["C_per_ND"]
      n_opt = g * scaled ** (beta / (alpha + beta))
      d_opt = scaled ** (alpha / (alpha + beta)) / g
    return {
      "C": budget,
      "N_opt": n_opt,
      "D_opt": d_opt,
      "tokens_per_param": d_opt / n_opt,
      "loss": predict_loss(params, n_opt, d_opt),
    }


def _optimal_size(params: dict, budget, compute: dict, iterations: int = 80):
  """argmin over N of L(N, C / (N r(N))), broadcast over params and budgets: golden-section search in log N
  over 7 e-folds either side of the closed-form optimum at r's geometric mean (NaN where alpha or beta <= 0)."""
  alpha, beta, a_coef, b_coef, budget = np.broadcast_arrays(
    *(np.asarray(params[k], np.float64) for k in ("alpha", "beta", "A", "B")), np.asarray(budget, np.float64)
  )
  a_log, b_log, log_c = np.log(a_coef), np.log(b_coef), np.log(budget)
  valid = (alpha > 0) & (beta > 0)
  alpha, beta = np.where(valid, alpha, 0.3), np.where(valid, beta, 0.3)
  log_k = np.mean(np.log(compute["C_per_ND"]))
  guess = ((a_log + np.log(alpha)) - (b_log + np.log(beta)) + beta * (log_c - log_k)) / (alpha + beta)

  def reducible(u):  # L - E: A / N^alpha + B / D^beta with D = C / (N r(N)), in logs against overflow
    log_r = np.log(c_per_nd(compute, np.exp(u)))
    return np.exp(a_log - alpha * u) + np.exp(b_log - beta * (log_c - u - log_r))

  shrink = (math.sqrt(5) - 1) / 2
  lo, hi = guess - 7.0, guess + 7.0
  for _ in range(iterations):
    u1, u2 = hi - shrink * (hi - lo), lo + shrink * (hi - lo)
    left = reducible(u1) < reducible(u2)
    lo, hi = np.where(left, lo, u1), np.where(left, u2, hi)
  return np.where(valid, np.exp((lo + hi) / 2), np.nan)


def allocation_exponents(params: dict, compute: dict, c_range: tuple[float, float]):
  """(a, b), the exponents of N_opt and D_opt in C under the parametric law and a `compute_model`: beta/(alpha+beta)
  and alpha/(alpha+beta) when C = k N D, else the least-squares slopes of log N_opt and log D_opt against log C
  at 33 budgets spanning `c_range`. Parameters may be arrays (bootstrap draws)."""
  alpha, beta = np.asarray(params["alpha"], np.float64), np.asarray(params["beta"], np.float64)
  if "N" not in compute:
    return beta / (alpha + beta), alpha / (alpha + beta)
  log_c_K = np.linspace(np.log(c_range[0]), np.log(c_range[1]), 33)
  at = optimal_allocation({k: np.asarray(params[k])[..., None] for k in PARAMETRIC}, np.exp(log_c_K), compute)
  centred_K = log_c_K - log_c_K.mean()
  slopes = []
  for name in ("N_opt", "D_opt"):
    log_x = np.log(at[name])
    slopes.append(np.sum((log_x - log_x.mean(-1, keepdims=True)) * centred_K, -1) / np.sum(centred_K**2))
  return tuple(slopes)


def power_law(x, y) -> tuple[float, float]:
  """(exponent, coefficient) of the least-squares line log y = exponent log x + log coefficient."""
  slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
  with np.errstate(over="ignore"):  # a degenerate resample's line can be near vertical; its draw is dropped
    return float(slope), float(np.exp(intercept))


def group_budgets(c, tolerance: float = 0.2) -> np.ndarray:
  """Budget index of each run: sorted C values within a factor 1 + `tolerance` of a group's first share it."""
  order = np.argsort(c)
  groups, current, first = np.empty(len(c), int), -1, None
  for i in order:
    if first is None or c[i] > first * (1 + tolerance):
      current, first = current + 1, c[i]
    groups[i] = current
  return groups


def approach1(n, d, c, loss, budget_tolerance: float = 0.2) -> dict:
  """Lower envelope of loss against compute, then N_opt, D_opt power laws through it.

  Runs are binned by compute (within a factor 1 + `budget_tolerance`, as Approach 2 groups budgets); the
  envelope holds each bin's best run if it beats every cheaper bin's. Binning keeps runs of one budget, whose
  C differ by rounding, from forming a near-vertical line.
  """
  groups = group_budgets(c, budget_tolerance)
  best_per_bin = [idx[np.argmin(loss[idx])] for idx in (np.flatnonzero(groups == g) for g in range(groups.max() + 1))]
  lowest, frontier = np.inf, []
  for i in best_per_bin:
    if loss[i] < lowest:
      lowest = loss[i]
      frontier.append(i)
  frontier = np.array(frontier)
  if len(frontier) < 2:
    raise UserError("approach 1 needs at least two compute budgets on the loss-compute frontier")
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
  """Kaplan et al. power laws L = (X_c / X)^alpha_X through the best loss at each N, each D and the compute frontier.

  A flat or degenerate fit (alpha_X near 0, as a bootstrap resample can give) has an infinite X_c, not an error.
  """
  series = {}
  for name, x in (("N", n), ("D", d)):
    values = np.unique(x)
    if len(values) >= 2:
      series[name] = (values, np.array([loss[x == v].min() for v in values]))
  frontier = approach1(n, d, c, loss)["frontier"]
  series["C"] = (c[frontier], loss[frontier])
  out = {}
  for name, (x, best) in series.items():
    slope, coef = power_law(x, best)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
      out[f"alpha_{name}"], out[f"{name}_c"] = -slope, float(np.power(coef, -1.0 / slope))
  return out


APPROACHES = ("1", "2", "3", "kaplan")
_POWER_FITS = {
  "1": lambda t, window: approach1(t["N"], t["D"], t["C"], t["loss"]),
  "2": lambda t, window: approach2(t["N"], t["D"], t["C"], t["loss"], window),
  "kaplan": lambda t, window: kaplan(t["N"], t["D"], t["C"], t["loss"]),
}


def power_allocation(fit: dict, budget) -> dict:
  """N_opt = N_coef C^a and D_opt = D_coef C^b of a power-law approach (arrays broadcast, e.g. bootstrap draws)."""
  n_opt, d_opt = fit["N_coef"] * budget ** fit["a"], fit["D_coef"] * budget ** fit["b"]
  return {"C": budget, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt}


def _interval(draws) -> list[float]:
  draws = np.asarray(draws, np.float64)
  draws = draws[np.isfinite(draws)]
  return np.percentile(draws, [2.5, 97.5]).tolist() if len(draws) else [math.nan, math.nan]


def _bootstrap_power_fit(approach: str, table: dict, window: float, resamples: int, rng) -> dict[str, np.ndarray]:
  """{name: draws} of the scalar results of a power-law approach refitted on `resamples` resamples of the runs.

  Resamples on which the approach fails (too few budgets or frontier points left) are skipped.
  """
  fits = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the full fit has already warned about its own data
    for _ in range(resamples):
      idx = rng.integers(0, len(table["N"]), len(table["N"]))
      try:
        fits.append(_POWER_FITS[approach]({k: v[idx] for k, v in table.items()}, window))
      except (UserError, np.linalg.LinAlgError, ValueError):
        continue
  names = [k for k, v in fits[0].items() if isinstance(v, float) and all(k in f for f in fits)] if fits else []
  return {k: np.array([f[k] for f in fits]) for k in names}


def fit_table(
  table: dict,
  approaches=APPROACHES,
  budget: float | None = None,
  predict: tuple[float, float] | None = None,
  bootstrap: int = 1000,
  window: float = 0.0,
  convention: str = "as given",
  seed: int = 0,
  grid: np.ndarray | None = None,
  keep_draws: bool = False,
) -> dict:
  """Fits every requested approach to a table of N, D, C, loss arrays; returns a JSON-ready dict.

  Every approach works under the table's C, whose convention `convention` names: `flops_convention` at the
  top and in each approach, `compute` (the `compute_model` Approach 3's allocation is derived under) and
  `compute_is` (it in words). Each approach gets 95% bootstrap intervals (`ci95`) over `bootstrap`
  resamples of the runs, the compute-optimal allocation at `budget` with intervals (`at_budget`), and
  Approach 3 the predicted loss at `predict` = (N, D); when C is not k N D, Approach 3's a and b are slopes
  over `exponents_over_C`, the table's range of C. With `keep_draws`, each approach keeps its bootstrap
  draws under `_draws`, for bands. When several approaches are requested, one that cannot be fitted
  (Approach 2 with fewer than two budgets whose minimum lies inside the sampled sizes, say) is reported as
  `{"error": ...}` with a warning.
  """
  compute = compute_model(table["N"], table["D"], table["C"])
  out = {
    "runs": len(table["N"]),
    "flops_convention": convention,
    "compute": compute,
    "compute_is": describe_compute(compute),
    "bootstrap": bootstrap,
  }
  c_range = (float(table["C"].min()), float(table["C"].max()))
  rng = np.random.default_rng(seed)
  for approach in approaches:
    if approach not in APPROACHES:
      raise UserError(f"unknown approach {approach!r}; known: {', '.join(APPROACHES)}")
    key = f"approach{approach}" if approach != "kaplan" else "kaplan"
    if approach == "3":
      fit = fit_parametric(table["N"], table["D"], table["loss"], grid=grid, bootstrap=bootstrap, seed=seed)
      draws = fit.pop("bootstrap", {})
      if "N" in compute:
        fit["a"], fit["b"] = (float(x) for x in allocation_exponents(fit, compute, c_range))
        fit["exponents_over_C"] = list(c_range)
        if draws:
          draws["a"], draws["b"] = allocation_exponents(draws, compute, c_range)
    else:
      try:
        fit = _POWER_FITS[approach](table, window)
      except UserError as e:
        if len(approaches) == 1:
          raise
        warnings.warn(f"{key} not fitted: {e}", stacklevel=2)  # the other approaches still are
        out[key] = {"error": str(e)}
        continue
      draws = _bootstrap_power_fit(approach, table, window, bootstrap, rng) if bootstrap else {}
    fit = {"flops_convention": convention, **fit}
    fit["ci95"] = {k: _interval(v) for k, v in draws.items() if len(v)}
    if budget and approach != "kaplan":
      if approach == "3":
        at = optimal_allocation(fit, budget, compute)
        boot = optimal_allocation(draws, budget, compute) if draws else {}
      else:
        at = power_allocation(fit, budget)
        boot = power_allocation(draws, budget) if draws else {}
      fit["at_budget"] = {k: float(v) for k, v in at.items()}
      fit["at_budget"]["ci95"] = {k: _interval(boot[k]) for k in at if k != "C" and k in boot}
    if predict and approach == "3":
      fit["predicted_loss"] = {"N": predict[0], "D": predict[1], "loss": float(predict_loss(fit, *predict))}
      if draws:
        fit["predicted_loss"]["ci95"] = _interval(predict_loss(draws, *predict))
    if keep_draws:
      fit["_draws"] = draws
    out[key] = fit
  return out


def write_fit(result: dict, out_dir: str) -> str:
  """Writes `fit.json` into `out_dir`; returns its path."""

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
    res = minimize(objective, start, method="L-BFGS-B", options={"ftol": 1e-13, "gtol": 1e-10, "maxiter": 5000})
    if res.fun < best_value:
      best, best_value = res.x, float(res.fun)
  return {**_named(best), "objective": best_value}


def bench(table_path: str, scipy_starts: int = 150) -> dict:
  """Approach 3 over the full 4,500-start grid: the batched fit (timed cold, with compilation, then warm)
  against scipy's L-BFGS-B in a Python loop, timed on `scipy_starts` random starts and extrapolated."""
  t, _ = load_table(table_path)
  cold = fit_parametric(t["N"], t["D"], t["loss"])
  warm = fit_parametric(t["N"], t["D"], t["loss"])
  grid = init_grid()
  scipy_starts = min(scipy_starts, len(grid))
  sample = grid[np.random.default_rng(0).choice(len(grid), scipy_starts, replace=False)]
  start = time.perf_counter()
  reference = scipy_fit(t["N"], t["D"], t["loss"], sample)
  scipy_s = time.perf_counter() - start
  scipy_full_s = scipy_s * len(grid) / scipy_starts
  return {
    "benchmark": "fit",
    "table": table_path,
    "starts": len(grid),
    "batched_s": round(cold["fit_seconds"], 2),
    "batched_s_warm": round(warm["fit_seconds"], 2),
    "scipy_starts_timed": scipy_starts,
    "scipy_s_timed": round(scipy_s, 2),
    "scipy_s_full_grid": round(scipy_full_s, 1),
    "scipy_s_full_grid_is": f"extrapolated: {scipy_starts} random grid starts timed, x {len(grid)}/{scipy_starts}",
    "speedup": round(scipy_full_s / cold["fit_seconds"], 1),
    "objective_batched": cold["objective"],
    "objective_scipy": reference["objective"],
    "same_optimum": all(abs(cold[k] / reference[k] - 1) < 1e-3 for k in PARAMETRIC),
    "params_batched": {k: cold[k] for k in PARAMETRIC},
    "params_scipy": {k: reference[k] for k in PARAMETRIC},
    "grad_norm_batched": cold["grad_norm"],
    "starts_in_best_basin": cold["starts_in_best_basin"],
  }
