"""One FLOP convention per scaling table: every approach's exponents hold under the table's own C."""

import csv
import json

import numpy as np
import pytest

from lm import cli
from lm.errors import UserError
from lm.scaling import fit

TRUE = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.28}
SEQ_LEN = 1024
TOLERANCE = 0.01  # on a and b; C = 6 N D's closed form misses the true b by 0.055 here


def flops_per_token(n):
  """6N + attention of a ladder with d_model = 64 n_layers and N = 12 n_layers d_model^2: 6N + 12 L T d_model.

  The attention term is 98% of 6N at N = 1e6, 45% at 1e7 and 21% at 1e8.
  """
  layers = (n / (12 * 64**2)) ** (1 / 3)
  return 6 * n + 12 * layers * SEQ_LEN * 64 * layers


def true_optimum(budget):
  """(N_opt, D_opt) of TRUE at `budget` under C = D flops_per_token(N), by brute force over a fine grid of N."""
  n = np.exp(np.linspace(np.log(1e4), np.log(1e11), 200001))
  d = budget / flops_per_token(n)
  best = np.argmin(fit.predict_loss(TRUE, n, d))
  return n[best], d[best]


def isoflop_table():
  """Runs of 7 budgets from 1e16 to 1e18 FLOPs on a fixed ladder of N (8 per decade), within 0.8 decades of
  each budget's optimum; D from C = D flops_per_token(N); loss from TRUE, noise-free."""
  ladder = 10 ** np.arange(5, 10, 1 / 8)
  rows = []
  for budget in np.geomspace(1e16, 1e18, 7):
    n_opt, _ = true_optimum(budget)
    for n in ladder[np.abs(np.log10(ladder / n_opt)) <= 0.8]:
      d = budget / flops_per_token(n)
      rows.append((n, d, budget, fit.predict_loss(TRUE, n, d)))
  n, d, c, loss = map(np.array, zip(*rows, strict=True))
  return {"N": n, "D": d, "C": c, "loss": loss}


def true_exponents(c):
  """Least-squares slopes of log N_opt and log D_opt against log C over the table's range of C."""
  budgets = np.geomspace(c.min(), c.max(), 33)
  n_opt, d_opt = np.array([true_optimum(b) for b in budgets]).T
  return np.polyfit(np.log(budgets), np.log(n_opt), 1)[0], np.polyfit(np.log(budgets), np.log(d_opt), 1)[0]


def test_every_approach_recovers_the_exponents_under_the_tables_convention():
  t = isoflop_table()
  a_true, b_true = true_exponents(t["C"])
  beta_share, alpha_share = TRUE["beta"] / 0.62, TRUE["alpha"] / 0.62  # the closed form under C = k N D
  assert abs(b_true - alpha_share) > 4 * TOLERANCE  # the test tells the conventions apart
  result = fit.fit_table(t, ("1", "2", "3"), bootstrap=0, convention="6N+attn", grid=fit.init_grid()[::15])
  assert result["flops_convention"] == "6N+attn" and "N" in result["compute"]
  for key in ("approach1", "approach2", "approach3"):
    assert result[key]["flops_convention"] == "6N+attn"
    assert abs(result[key]["a"] - a_true) < TOLERANCE, (key, result[key]["a"], a_true)
    assert abs(result[key]["b"] - b_true) < TOLERANCE, (key, result[key]["b"], b_true)
  fit3 = result["approach3"]
  assert fit3["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-6) and fit3["beta"] == pytest.approx(
    TRUE["beta"], rel=1e-6
  )
  assert fit3["exponents_over_C"] == [pytest.approx(1e16), pytest.approx(1e18)]
  assert abs(fit3["b"] - alpha_share) > 4 * TOLERANCE and fit3["a"] != pytest.approx(beta_share, abs=1e-3)


def test_allocation_under_the_tables_c_is_the_true_optimum_and_spends_the_budget():
  t = isoflop_table()
  compute = fit.compute_model(t["N"], t["D"], t["C"])
  np.testing.assert_allclose(fit.c_per_nd(compute, t["N"]) * t["N"] * t["D"], t["C"], rtol=1e-12)
  for budget in (2e16, 3e17):  # inside the table's range of N_opt, where r(N) interpolates the table
    at = fit.optimal_allocation(TRUE, budget, compute)
    n_opt, d_opt = true_optimum(budget)
    assert at["N_opt"] == pytest.approx(n_opt, rel=2e-3) and at["D_opt"] == pytest.approx(d_opt, rel=2e-3)
    assert at["D_opt"] * flops_per_token(at["N_opt"]) == pytest.approx(budget, rel=1e-3)
  draws = {k: np.array([v, v * 1.01, v]) for k, v in TRUE.items()}
  draws["alpha"][2] = -0.1  # no optimum: NaN, not an error
  n_draws = fit.optimal_allocation(draws, 1e17, compute)["N_opt"]
  assert np.isfinite(n_draws[:2]).all() and np.isnan(n_draws[2])


def test_a_table_whose_c_is_k_n_d_keeps_the_closed_form():
  n, d = np.array([1e8, 2e8, 4e8]), np.array([1e10, 3e9, 2e9])
  compute = fit.compute_model(n, d, 6 * n * d * (1 + 1e-9 * np.array([1, -1, 0])))  # rounding, as in published C
  assert compute == {"C_per_ND": pytest.approx(6.0)}
  at = fit.optimal_allocation(TRUE, 1e21, compute)
  assert at["N_opt"] == pytest.approx(fit.optimal_allocation(TRUE, 1e21)["N_opt"], rel=1e-9)
  a, b = fit.allocation_exponents(TRUE, compute, (1e18, 1e20))
  assert a == pytest.approx(TRUE["beta"] / 0.62) and b == pytest.approx(TRUE["alpha"] / 0.62)


def write_results(path, t, conventions):
  with open(path, "w") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "N", "D", "C", "flops_convention", "loss", "flags"])
    for i, row in enumerate(zip(t["N"], t["D"], t["C"], t["loss"], strict=True)):
      n, d, c, loss = (repr(float(x)) for x in row)
      writer.writerow([f"r{i}", n, d, c, conventions[i % len(conventions)], loss, "wsd"])


def test_report_and_fit_json_state_the_convention_beside_every_exponent(tmp_path, capsys):
  t = isoflop_table()
  write_results(tmp_path / "results.csv", t, ["6N+attn"])
  argv = ["scaling", "report", str(tmp_path), "--bootstrap", "20", "--grid-stride", "150", "--budget", "1e19"]
  assert cli.main(argv) == 0
  text = open(capsys.readouterr().out.strip()).read()
  result = json.loads((tmp_path / "report" / "fit.json").read_text())
  assert result["flops_convention"] == "6N+attn" and result["compute_is"].startswith("C = r(N) N D")
  assert "C is counted as `6N+attn` in every approach" in text
  for key in ("approach1", "approach2", "approach3"):
    assert result[key]["flops_convention"] == "6N+attn"
    lo, hi = result[key]["ci95"]["b"]
    assert lo <= result[key]["b"] <= hi, key
  assert text.count("Exponents a and b and the allocation at the budget: C counted as `6N+attn`") == 3
  assert "as slopes of log N_opt and log D_opt over C = " in text
  at = result["approach3"]["at_budget"]
  assert at["D_opt"] * flops_per_token(at["N_opt"]) == pytest.approx(1e19, rel=0.1)  # r(N) held beyond the ladder


def test_a_table_names_one_convention(tmp_path, capsys):
  t = isoflop_table()
  write_results(tmp_path / "mixed.csv", t, ["6N+attn", "6N"])
  with pytest.raises(UserError, match="mixes FLOP conventions \\(6N, 6N\\+attn\\)"):
    fit.load_table(str(tmp_path / "mixed.csv"))
  write_results(tmp_path / "one.csv", t, ["6N+attn"])
  assert cli.main(["scaling", "fit", str(tmp_path / "one.csv"), "--flops-per-param-token", "8"]) == 2
  assert "has a C column; --flops-per-param-token applies only" in capsys.readouterr().err
