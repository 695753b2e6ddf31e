"""IsoFLOP study on 2 CPU cores: 3 compute budgets x 4 model sizes on the standard library, byte-level.

  lm sweep --config experiments/isoflop_cpu.py --workdir runs/isoflop_cpu --no-progress
  lm scaling report runs/isoflop_cpu --budget 1e14

Budgets 1e12, 2e12 and 4e12 training FLOPs (`6N+attn`, the training loop's convention) x 4 models of 1 to
4 layers of width 32 x n_layers (2.2e4 to 8.4e5 parameters, N = blocks + head), batch 32 x 128 bytes,
lr 3e-3 at d_model 128 scaled as 1/d_model, warmup N tokens (at most a fifth of the shortest run of a size).
Cooldown branching (Hägele et al. 2024): per size, one WSD run for the largest budget; the two smaller
budgets branch off it for their last 20% of steps, so the 12 results cost 4 x (4 + 0.2 x (1 + 2)) = 18.4e12
FLOPs instead of 28e12.
Time: estimated at about 25 minutes from 150-step runs of single points on 2 busy cores (22k to 54k
tokens/s for the 1- and 2-layer models at batch 32, 4.1k for the 4-layer one at batch 16); not yet measured
end to end.
Fitted a and b with their intervals: not run yet (fill in from `runs/isoflop_cpu/report/report.md`).
"""

from lm.config import default_config
from lm.scaling import accounting, sweep

BUDGETS = (1e12, 2e12, 4e12)
SIZES = (2.2e4, 1.24e5, 3.6e5, 8.4e5)


def get_config():
  c = default_config()
  c.data.source = "stdlib"
  c.data.seq_len = 128
  c.tokenizer.kind = "byte"
  c.model.d_model = 128
  c.train.batch_size = 32
  c.train.eval_every = 500
  c.train.eval_batches = 16
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.optim.lr = 3e-3
  c.optim.final_lr_fraction = 0.0
  return c


def get_sweep():
  base = get_config()
  vocab = accounting.vocab_size(base)
  shapes = sweep.size_ladder(list(SIZES), vocab, aspect=32, head_dim=32)
  return sweep.cooldown_branches(sweep.isoflop_grid(base, list(BUDGETS), shapes, vocab), cooldown_fraction=0.2)
