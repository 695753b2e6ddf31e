import json

from lm import metrics as metrics_lib


def test_rows_are_appended_and_mirrored_to_tensorboard(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write(1, 100, 1e9, {"train/loss": 3.0, "lr": 0.1})
  writer.write(2, 200, 2e9, {"train/loss": 2.5, "eval/loss": float("nan")})
  writer.close()
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert rows == [
    {"step": 1, "tokens": 100, "flops": 1e9, "train/loss": 3.0, "lr": 0.1},
    {"step": 2, "tokens": 200, "flops": 2e9, "train/loss": 2.5, "eval/loss": None},  # JSON has no NaN
  ]
  events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 100


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": s}) + "\n" for s in range(1, 8)))
  metrics_lib.MetricsWriter(str(tmp_path), resume_step=4).close()
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3, 4]


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), enabled=False)
  writer.write(1, 1, 1.0, {"train/loss": 1.0})
  assert not (tmp_path / "metrics.jsonl").exists()


def test_series_picks_logged_points():
  rows = [{"step": 1, "tokens": 10, "train/loss": 2.0}, {"step": 2, "tokens": 20, "eval/loss": 1.5}]
  assert metrics_lib.series(rows, "eval/loss") == ([20], [1.5])
  assert metrics_lib.series(rows, "train/loss", x="step") == ([1], [2.0])
