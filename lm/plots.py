"""Loss-curve figures: train and eval loss against tokens and FLOPs, on log axes.

Each eval source (`eval/NAME/loss`) is drawn beside the validation split's `eval/loss`, dashed
and with its own marker, in the run's colour; crosses mark the loss of the next train batches
before they were trained on, which the train curve should meet.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402

from lm.metrics import read_metrics, series  # noqa: E402

X_AXES = {"tokens": "tokens", "flops": "training FLOPs"}


def plot_runs(workdirs: list[str], out_dir: str, labels: list[str] | None = None) -> list[str]:
  """Writes `loss_vs_tokens.png` and `loss_vs_flops.png` overlaying the runs; returns the paths."""
  labels = labels or [epath.Path(w).name for w in workdirs]
  runs = [(label, read_metrics(w)) for label, w in zip(labels, workdirs, strict=True)]
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for x, xlabel in X_AXES.items():
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, rows) in enumerate(runs):
      color = f"C{i % 10}"
      prefix = f"{label} " if len(runs) > 1 else ""
      tx, ty = series(rows, "train/loss", x)
      ex, ey = series(rows, "eval/loss", x)
      if tx:
        ax.plot(tx, ty, color=color, alpha=0.45, lw=1, label=f"{prefix}train")
      if ex:
        ax.plot(ex, ey, color=color, marker="o", ms=3, lw=1.5, label=f"{prefix}eval")
      nx, ny = series(rows, "eval/next_train_batches_loss", x)
      if nx:
        ax.plot(nx, ny, color=color, marker="x", ms=4, lw=0, label=f"{prefix}next train batches (unseen)")
      for j, name in enumerate(eval_source_names(rows)):
        sx, sy = series(rows, f"eval/{name}/loss", x)
        marker = "s^vD<>"[j % 6]
        ax.plot(sx, sy, color=color, marker=marker, ms=3, lw=1, ls="--", label=f"{prefix}eval {name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
    ax.set_title(f"loss against {xlabel}")
    fig.tight_layout()
    path = out / f"loss_vs_{x}.png"
    with path.open("wb") as f:
      fig.savefig(f, dpi=120)
    plt.close(fig)
    paths.append(str(path))
  return paths


def eval_source_names(rows: list[dict]) -> list[str]:
  """The NAMEs of the `eval/NAME/loss` series in a run's metrics, in order of appearance."""
  names = {}
  for row in rows:
    for key in row:
      if key.startswith("eval/") and key.endswith("/loss") and key.count("/") == 2:
        names[key.split("/")[1]] = None
  return list(names)
