import csv
import json

import numpy as np
from scaling_fit_test import isoflop_table

from lm import cli

STEMS = ("isoflop", "frontier", "contours", "residuals", "loss_vs_flops")


def fake_curves(t):
  """Eval curves ending at each run's final loss, as a sweep's curves.csv holds them."""
  return [
    {"id": f"r{i}", "N": float(n), "D": float(d) * f, "C": float(c) * f, "loss": float(loss) + 1.0 - f}
    for i, (n, d, c, loss) in enumerate(zip(t["N"], t["D"], t["C"], t["loss"], strict=True))
    for f in (0.25, 0.5, 1.0)
  ]


def test_report_of_a_sweep_directory(tmp_path, capsys):
  t = isoflop_table()
  with open(tmp_path / "results.csv", "w") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "N", "D", "C", "C_spent", "flops_convention", "loss", "flags"])
    for i, (n, d, c, loss) in enumerate(zip(t["N"], t["D"], t["C"], t["loss"], strict=True)):
      flags = "wsd;branch:x@1" if i % 7 else "wsd"
      writer.writerow([f"r{i}", n, d, c, c / 5 if i % 7 else c, "6N+attn", repr(float(loss)), flags])
  with open(tmp_path / "curves.csv", "w") as f:
    writer = csv.DictWriter(f, fieldnames=["id", "N", "D", "C", "loss"])
    writer.writeheader()
    writer.writerows(fake_curves(t))
  argv = ["scaling", "report", str(tmp_path), "--bootstrap", "20", "--grid-stride", "150", "--budget", "1e21"]
  assert cli.main(argv) == 0
  out, err = capsys.readouterr()
  assert all(line.startswith("lm: warning: approach 2") for line in err.splitlines())  # no numpy warnings
  text = open(out.strip()).read()
  result = json.loads((tmp_path / "report" / "fit.json").read_text())
  assert result["flops_convention"] == "6N+attn" and "C is counted as `6N+attn` in every approach" in text
  assert all(result[k]["flops_convention"] == "6N+attn" for k in ("approach1", "approach2", "approach3", "kaplan"))
  assert f"| a | {result['approach2']['a']!r} |" in text  # unrounded
  assert "18 cooldown branches" in text
  for stem in STEMS:
    assert f"![{stem}]({stem}.png)" in text
    for ext in ("png", "svg"):
      assert (tmp_path / "report" / f"{stem}.{ext}").stat().st_size > 5000
  assert not np.isnan(result["approach3"]["at_budget"]["N_opt"])
