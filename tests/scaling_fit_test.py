import json
import os
import warnings

import numpy as np
import pytest

from lm import cli
from lm.errors import UserError
from lm.scaling import fit

CHINCHILLA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "scaling", "chinchilla_240.csv")
TRUE = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.30}


def synthetic(noise=0.0005, seed=0):
  rng = np.random.default_rng(seed)
  n = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 300))
  d = np.exp(rng.uniform(np.log(1e9), np.log(1e12), 300))
  loss = fit.predict_loss(TRUE, n, d) * np.exp(noise * rng.standard_normal(300))
  return n, d, loss


def test_allocation_is_consistent_with_the_law():
  alloc = fit.optimal_allocation(TRUE, 1e21)
  assert alloc["N_opt"] * alloc["D_opt"] * 6 == pytest.approx(1e21)
  for scale in (0.9, 1.1):  # the optimum beats nearby points on the same budget
    assert alloc["loss"] < fit.predict_loss(TRUE, alloc["N_opt"] * scale, alloc["D_opt"] / scale)


def huber_objective(t, params):
  """The Approach 3 objective (sum of Huber(1e-3) of log residuals) at named parameters, in plain numpy."""
  pred = np.log(fit.predict_loss(params, t["N"], t["D"]))
  r = np.abs(pred - np.log(t["loss"]))
  return float(np.sum(np.where(r < 1e-3, 0.5 * r * r, 1e-3 * (r - 0.5e-3))))


@pytest.mark.skipif(not os.path.exists(CHINCHILLA), reason="../shared/data absent")
def test_chinchilla_reaches_the_global_optimum_and_an_under_converged_fit_is_worse():
  t, convention = fit.load_table(CHINCHILLA)
  assert convention == "as given"
  assert fit.compute_model(t["N"], t["D"], t["C"]) == {"C_per_ND": pytest.approx(6.0, rel=1e-8)}
  best = fit.fit_parametric(t["N"], t["D"], t["loss"])
  assert best["starts"] == 4500 and best["starts_failed"] == 0
  # Besiroglu et al. (2024): E 1.8172, alpha 0.3478, beta 0.3658 (A and B are weakly identified).
  assert best["E"] == pytest.approx(1.8172, abs=0.005)
  assert best["alpha"] == pytest.approx(0.3478, abs=0.005)
  assert best["beta"] == pytest.approx(0.3658, abs=0.005)
  assert best["objective"] == pytest.approx(huber_objective(t, best), rel=1e-9)
  assert best["grad_norm"] < 1e-8 and best["starts_in_best_basin"] >= 5
  # Lower than at the published optimum, and than Hoffmann et al.'s printed (unconverged) fit.
  published = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
  hoffmann = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
  assert best["objective"] < huber_objective(t, published) < huber_objective(t, hoffmann)
  loose = fit.fit_parametric(
    t["N"], t["D"], t["loss"], grid=fit.init_grid()[::90], reduce="mean", max_iter=15, tol=1e-3, polish=0
  )
  assert huber_objective(t, loose) > best["objective"] * 1.01


def isoflop_table(vertex_outside=False):
  rows = []
  for c in (1e18, 1e19, 1e20):
    n_opt = 0.1 * c**0.5
    for f in (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8):
      n = n_opt * f * (16 if vertex_outside and c == 1e19 else 1)
      rows.append((n, c / (6 * n), c, 2.0 + 0.05 * np.log(n / n_opt) ** 2 + 1e3 / c**0.1))
  n, d, c, loss = map(np.array, zip(*rows, strict=True))
  return {"N": n, "D": d, "C": c, "loss": loss}


def test_approach2_recovers_exponents_and_warns_when_vertex_outside():
  t = isoflop_table()
  result = fit.approach2(t["N"], t["D"], t["C"], t["loss"])
  assert result["a"] == pytest.approx(0.5, abs=1e-6) and result["b"] == pytest.approx(0.5, abs=1e-6)
  t = isoflop_table(vertex_outside=True)
  with pytest.warns(UserWarning, match="vertex outside the sampled N range.*1e\\+19"):
    result = fit.approach2(t["N"], t["D"], t["C"], t["loss"])
  assert result["vertex_outside_range"] == [pytest.approx(1e19)]
  two_budgets = {k: v[t["C"] < 5e19] for k, v in t.items()}  # one of them with its vertex outside: no fit
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    both = fit.fit_table(two_budgets, ("1", "2"), bootstrap=0)
  assert "error" in both["approach2"] and "a" in both["approach1"]
  assert any("approach2 not fitted" in str(w.message) for w in caught)


def test_approach1_and_kaplan():
  t = isoflop_table()
  a1 = fit.approach1(t["N"], t["D"], t["C"], t["loss"])
  assert 0.3 < a1["a"] < 0.7 and a1["a"] + a1["b"] == pytest.approx(1.0) and len(a1["frontier"]) == 3
  k = fit.kaplan(t["N"], t["D"], t["C"], t["loss"])
  assert k["alpha_C"] > 0


def write_table(path, n, d, loss):
  path.write_text(
    "N,D,loss\n" + "".join(f"{float(a)!r},{float(b)!r},{float(c)!r}\n" for a, b, c in zip(n, d, loss, strict=True))
  )
  return str(path)


def test_cli_fit_recovers_synthetic_parameters_with_intervals(tmp_path, capsys):
  path = write_table(tmp_path / "t.csv", *synthetic())
  argv = ["scaling", "fit", path, "--approach", "3", "--bootstrap", "50", "--budget", "1e21", "--predict", "1e9,2e10"]
  assert cli.main(argv + ["--grid-stride", "37", "--out", str(tmp_path / "out")]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["flops_convention"] == "C = 6 N D" and result["compute"] == {"C_per_ND": 6.0}
  assert result["approach3"]["flops_convention"] == "C = 6 N D" and "exponents_over_C" not in result["approach3"]
  assert json.loads((tmp_path / "out" / "fit.json").read_text()) == result
  fit3 = result["approach3"]
  for name, value in TRUE.items():
    assert abs(fit3[name] / value - 1) < 0.01, (name, fit3[name], value)
  assert fit3["grad_norm"] < 1e-8
  for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
    lo, hi = fit3["ci95"][name]
    assert lo <= fit3[name] <= hi, name
  for name in ("N_opt", "D_opt", "tokens_per_param"):
    lo, hi = fit3["at_budget"]["ci95"][name]
    assert lo <= fit3["at_budget"][name] <= hi
  predicted = fit3["predicted_loss"]
  assert predicted["loss"] == pytest.approx(fit.predict_loss(TRUE, 1e9, 2e10), rel=0.01)
  assert predicted["ci95"][0] <= predicted["loss"] <= predicted["ci95"][1]


def test_cli_errors_are_one_line(tmp_path, capsys):
  path = write_table(tmp_path / "t.csv", *synthetic())
  for argv, message in (
    (["scaling", "fit", path, "--predict", "1e9"], "--predict must be N,D"),
    (["scaling", "fit", path, "--budget", "-1"], "--budget must be a positive"),
    (["scaling", "fit", str(tmp_path / "none.csv")], "cannot read table"),
    (["scaling", "report", str(tmp_path)], "has no results.csv"),
  ):
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lm: error: ") and message in lines[0], lines


def test_bench_fit_prints_json_comparing_with_scipy(tmp_path, capsys, monkeypatch):
  path = write_table(tmp_path / "t.csv", *synthetic())
  near = np.log([TRUE["A"], TRUE["B"], TRUE["E"]]).tolist() + [TRUE["alpha"], TRUE["beta"]]
  small = np.array(near) + np.array([[0.5, -0.5, 0.1, 0.05, -0.05], [-1.0, 1.0, -0.1, -0.05, 0.05]])
  monkeypatch.setattr(fit, "init_grid", lambda: small)  # two starts that scipy finishes quickly
  assert cli.main(["bench", "fit", "--table", path]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["starts"] == len(small) and result["scipy_starts_timed"] == len(small)
  assert result["same_optimum"] and "extrapolated" in result["scipy_s_full_grid_is"]


def test_bad_table_is_a_user_error(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("N,loss\n1,2\n")
  with pytest.raises(UserError, match="lacks column"):
    fit.load_table(str(path))
  with pytest.raises(UserError, match="cannot read"):
    fit.load_table(str(tmp_path / "missing.csv"))


def test_loss_column_chooses_which_eval_set_is_fitted(tmp_path):
  n, d, loss = synthetic()
  path = tmp_path / "t.csv"
  rows = ["N,D,loss,loss_prose"] + [f"{a},{b},{9.0},{c}" for a, b, c in zip(n, d, loss, strict=True)]
  path.write_text("\n".join(rows) + "\n")
  table, _ = fit.load_table(str(path), loss_column="loss_prose")
  np.testing.assert_allclose(table["loss"], loss)
  assert (fit.load_table(str(path))[0]["loss"] == 9.0).all()
  with pytest.raises(UserError, match="lacks column"):
    fit.load_table(str(path), loss_column="loss_code")


def test_n_column_chooses_which_parameter_count_is_fitted(tmp_path):
  n, d, loss = synthetic()
  path = tmp_path / "t.csv"
  rows = ["N,N_all_experts,D,loss"] + [f"{a},{4 * a},{b},{c}" for a, b, c in zip(n, d, loss, strict=True)]
  path.write_text("\n".join(rows) + "\n")
  np.testing.assert_allclose(fit.load_table(str(path), n_column="N_all_experts")[0]["N"], 4 * np.asarray(n))
  np.testing.assert_allclose(fit.load_table(str(path))[0]["N"], n)
  with pytest.raises(UserError, match="lacks column"):
    fit.load_table(str(path), n_column="N_active")
