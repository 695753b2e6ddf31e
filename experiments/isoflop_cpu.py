"""IsoFLOP study on 2 CPU cores: 3 compute budgets x 4 model sizes on the standard library, byte-level.

  lm sweep --config experiments/isoflop_cpu.py --workdir runs/isoflop_cpu --no-progress
  lm scaling report runs/isoflop_cpu --budget 1e14

Budgets 1e12, 2e12 and 4e12 training FLOPs (`6N+attn`, the training loop's convention) x 4 models of 2 to
5 layers of width 16 x n_layers with 16-wide heads (3.5e4 to 4.2e5 parameters, N = blocks + head), batch
32 x 128 bytes, lr 2e-3 at d_model 128 scaled as 1/d_model, warmup N tokens (at most a fifth of the
shortest run of a size). A first version with sizes 2.2e4 to 8.4e5 found the optimum at or below its
smallest model at 1e12 and 2e12 FLOPs, hence these smaller sizes.
Cooldown branching (Hägele et al. 2024): per size, one WSD run for the largest budget; the two smaller
budgets branch off it for their last 20% of steps, so the 12 results cost 4 x (4 + 0.2 x (1 + 2)) = 18.4e12
FLOPs instead of 28e12.
Measured (2026-11-22, 2 CPU cores shared with other jobs, load 4-6): the sweep took 1748 s (29.1 min) and
`lm scaling report` 19 s; the first version took 1661 s. Compute: the 12 runs stand for 2.80e13 FLOPs, the
sweep spent 1.84e13 (34.3% saved by the 8 cooldown branches).
Fitted (runs/isoflop_cpu/report/report.md, 1,000 bootstrap resamples, 95% intervals): this study does not
pin the allocation down. The smallest model is the best one at 1e12 and 2e12 FLOPs, so Approach 2 has one
budget with its parabola's vertex inside the sizes and is not fitted; Approach 1 gives a = 0.723
[-1.44, 1.06], b = 0.318 [0.014, 2.36]; Approach 3 degenerates (alpha = 30.7: loss flat in N above 3.5e4)
with a = 0.011 [0.0045, 0.053], b = 0.989 [0.947, 0.995]. The runs are noisy: at constant lr the smallest
model's eval loss went 1.709 -> 1.945 -> 1.838 at steps 1500, 2000, 2500, and its 4e12 run ended at 1.730,
above its 2e12 branch (1.676). Smaller models or larger budgets, and a larger eval set, are the next step.
"""

from lm.config import default_config
from lm.scaling import accounting, sweep

BUDGETS = (1e12, 2e12, 4e12)
SIZES = (3.5e4, 9.6e4, 2.3e5, 4.2e5)


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
  c.optim.lr = 2e-3
  c.optim.final_lr_fraction = 0.0
  return c


def get_sweep():
  base = get_config()
  vocab = accounting.vocab_size(base)
  shapes = sweep.size_ladder(list(SIZES), vocab, aspect=16, head_dim=16)
  return sweep.cooldown_branches(sweep.isoflop_grid(base, list(BUDGETS), shapes, vocab), cooldown_fraction=0.2)
