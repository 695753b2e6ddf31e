import os

import numpy as np
from scaling_fit_test import isoflop_table

from lm.scaling import fit, report


def test_figures_are_written_and_non_empty(tmp_path):
  t = isoflop_table()
  result = fit.fit_table(t, budget=1e21, bootstrap=20, grid=fit.init_grid()[::150], keep_draws=True)
  curves = [
    {"id": f"r{i}", "N": 1e6, "D": d, "C": c, "loss": 3 - np.log10(c) / 10}
    for i in range(3)
    for d, c in ((1e6, 1e13), (2e6, 2e13))
  ]
  paths = report.figures(t, result, str(tmp_path), budget=1e21, curves=curves)
  names = {os.path.basename(p) for p in paths}
  for stem in ("isoflop", "frontier", "contours", "residuals", "loss_vs_flops"):
    assert {f"{stem}.png", f"{stem}.svg"} <= names
  assert all(os.path.getsize(p) > 5000 for p in paths)
