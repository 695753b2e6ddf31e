"""IsoFLOP study on 2 CPU cores: 3 compute budgets x 4 model sizes on the standard library, byte-level.

  lm sweep --config experiments/isoflop_cpu.py --workdir runs/isoflop_cpu --no-progress
  lm scaling report runs/isoflop_cpu --budget 1e14

Budgets 1e12, 2.2e12 and 5e12 training FLOPs (`6N+attn`, the training loop's convention) x 4 models of 2
to 5 layers of width 12 x n_layers with 12-wide heads (2.0e4 to 2.3e5 parameters, N = blocks + head),
batch 32 x 128 bytes, lr 2e-3 at d_model 128 scaled as 1/d_model, warmup N tokens (at most a fifth of the
shortest run of a size). Train rows are shuffled in windows of 32768 rows (4.2M bytes): the standard
library's largest file (pydoc_data/topics.py, 757 kB of English prose) otherwise fills whole stretches of
batches, and a small model's eval loss on code rose and fell by 0.2 nats as it went by. The eval set is 64
batches (262k bytes, most of the validation split).
Cooldown branching (Hägele et al. 2024): per size, one WSD run for the largest budget; the two smaller
budgets branch off it for their last 20% of steps, so the 12 results cost 4 x (5 + 0.2 x (1 + 2.2)) =
22.6e12 FLOPs instead of 32.8e12.
Measured (2026-11-23, 2 CPU cores, otherwise idle but for two 20-second benchmarks): the sweep took 1867 s
(31.1 min) and `lm scaling report` 23 s. Compute: the 12 runs stand for 3.28e13 FLOPs, the sweep spent
2.26e13 (31.2% saved by the 8 cooldown branches). The IsoFLOP minima move from N = 4.0e4 at 1e12 FLOPs to
6.7e4 at 2.2e12 and 1.6e5 at 5e12, all inside the sampled sizes.
Fitted (runs/isoflop_cpu/report/report.md, 1,000 bootstrap resamples, 95% intervals):
  Approach 2 (IsoFLOP parabolas): a = 0.865 [0.575, 1.18], b = 0.202 [-0.091, 0.472]
  Approach 3 (parametric, Huber on log loss): a = 0.723 [0.552, 0.865], b = 0.277 [0.135, 0.448]
    (E = 0.659, A = 13.5, B = 12343, alpha = 0.273, beta = 0.715; objective 4.06e-5, 9 of 4,500 starts
    in the best basin)
  Approach 1 (lower envelope of 3 budgets): a = 0.491 [-0.006, 1.52], too wide to say anything.
Parameters grow faster than tokens at this scale, as in Kaplan et al. 2020 (a = 0.73) rather than
Hoffmann et al. 2022 (a = 0.50); one fixed batch size and an lr rule not tuned per size are among the
choices Porian et al. 2024 found to steepen a. Three budgets within a factor of 5 leave wide intervals.
"""

from lm.config import default_config
from lm.scaling import accounting, sweep

BUDGETS = (1e12, 2.2e12, 5e12)
SIZES = (2.0e4, 5.6e4, 1.24e5, 2.32e5)


def get_config():
  c = default_config()
  c.data.source = "stdlib"
  c.data.seq_len = 128
  c.data.eval_fraction = 0.05  # 82 held-out files, 1.8 MB: the eval set samples many of them
  c.data.eval_sources = ("docstrings=stdlib_docstrings",)  # prose, fitted with --loss-column loss_docstrings
  c.tokenizer.kind = "byte"
  c.model.d_model = 128
  c.train.batch_size = 32
  c.train.eval_every = 500
  c.train.eval_batches = 64
  c.train.eval_next_train_batches = False  # 64 more batches per eval; the quickstart shows the agreement
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.optim.lr = 2e-3
  c.optim.final_lr_fraction = 0.0
  return c


def get_sweep():
  base = get_config()
  vocab = accounting.vocab_size(base)
  shapes = sweep.size_ladder(list(SIZES), vocab, aspect=12, head_dim=12)
  return sweep.cooldown_branches(sweep.isoflop_grid(base, list(BUDGETS), shapes, vocab), cooldown_fraction=0.2)
