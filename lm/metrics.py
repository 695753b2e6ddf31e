"""Run metrics: one JSON object per logged step in `metrics.jsonl`, mirrored to TensorBoard."""

import json
import math

from etils import epath


class MetricsWriter:
  """Appends `{"step", "tokens", "flops", name: value, ...}` rows; TensorBoard events go to `tb/`."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb = None
    if not enabled:
      return
    # Steps after the checkpoint we resume from are replayed; drop their old rows.
    rows = [r for r in read_metrics(workdir) if r["step"] <= resume_step] if resume_step else []
    self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (only the writing process needs it)

    self.tb = SummaryWriter(str(epath.Path(workdir) / "tb"), flush_secs=10)

  def write(self, step: int, tokens: int, flops: float, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "tokens": int(tokens), "flops": float(flops)}
    for name, value in metrics.items():
      row[name] = value if isinstance(value, str) else _finite_or_none(float(value))
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in row.items():
      if name not in ("step",) and isinstance(value, float | int):
        self.tb.add_scalar(name, value, global_step=int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _finite_or_none(x: float):
  return x if math.isfinite(x) else None


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `workdir/metrics.jsonl` (empty if there is none)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], name: str, x: str = "tokens") -> tuple[list, list]:
  """(x values, y values) of the rows that logged `name`."""
  pts = [(r[x], r[name]) for r in rows if r.get(name) is not None]
  return [p[0] for p in pts], [p[1] for p in pts]
