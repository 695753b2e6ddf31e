import json

import matplotlib.image

from lm import plots


def write_run(path, scale):
  path.mkdir()
  rows = [{"step": s, "tokens": 1000 * s, "flops": 1e9 * s, "train/loss": scale * 5 / s**0.3} for s in range(1, 50)]
  rows += [{"step": s, "tokens": 1000 * s, "flops": 1e9 * s, "eval/loss": scale * 5.1 / s**0.3} for s in (10, 20, 49)]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plots_overlay_runs_against_tokens_and_flops(tmp_path):
  write_run(tmp_path / "a", 1.0)
  write_run(tmp_path / "b", 0.8)
  paths = plots.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
  assert sorted(p.split("/")[-1] for p in paths) == ["loss_vs_flops.png", "loss_vs_tokens.png"]
  image = matplotlib.image.imread(paths[0])
  assert image.shape[0] > 300 and image.shape[1] > 400
  assert image[..., :3].std() > 0.05  # something was drawn


def test_run_without_metrics_still_plots(tmp_path):
  (tmp_path / "empty").mkdir()
  paths = plots.plot_runs([str(tmp_path / "empty")], str(tmp_path / "out"))
  assert len(paths) == 2
