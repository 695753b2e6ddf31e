"""Run metrics: one JSON object per logged step in `metrics.jsonl`, mirrored to TensorBoard."""

import json
import math

from etils import epath

from lm.errors import UserError


class MetricsWriter:
  """Appends `{"step", "tokens", "flops", name: value, ...}` rows; TensorBoard events go to `tb/` (texts as text)."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.tb = None
    if not enabled:
      return
    # Steps after the checkpoint we resume from are replayed; drop their old rows.
    rows = [r for r in read_metrics(workdir) if r["step"] <= resume_step] if resume_step else []
    replace_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
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
      if isinstance(value, str):  # a text (a sample); a code block keeps its whitespace
        self.tb.add_text(name, f"```\n{value}\n```", global_step=int(step))
      elif name not in ("step",) and isinstance(value, float | int):
        self.tb.add_scalar(name, value, global_step=int(step))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _finite_or_none(x: float):
  return x if math.isfinite(x) else None


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `workdir/metrics.jsonl` (empty if there is none).

  An unterminated last line is what a writer killed mid-row leaves; it is ignored.
  """
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  text = path.read_text()
  lines = text.splitlines()
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines) and not text.endswith("\n"):
        break
      raise UserError(f"{path}:{number}: not a JSON row") from None
  return rows


def replace_text(path: epath.Path, text: str) -> None:
  """Writes `path` through a temporary file and a rename: a killed writer leaves the old file or the new."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def series(rows: list[dict], name: str, x: str = "tokens") -> tuple[list, list]:
  """(x values, y values) of the rows that logged `name`."""
  pts = [(r[x], r[name]) for r in rows if r.get(name) is not None]
  return [p[0] for p in pts], [p[1] for p in pts]
