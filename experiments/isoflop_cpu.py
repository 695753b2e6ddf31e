"""IsoFLOP study on 2 CPU cores: 3 compute budgets x 4 model sizes on the standard library, byte-level.

  lm sweep --config experiments/isoflop_cpu.py --workdir runs/isoflop_cpu --no-progress
  lm scaling report runs/isoflop_cpu --budget 1e14

Budgets 1e12, 2.2e12 and 5e12 training FLOPs (`6N+attn`, the training loop's convention) x 4 models of 2
to 5 layers of width 12 x n_layers with 12-wide heads (2.0e4 to 2.3e5 parameters, N = blocks + head),
batch 32 x 128 bytes, lr 2e-3 at d_model 128 scaled as 1/d_model, warmup N tokens (at most a fifth of the
shortest run of a size). Train rows are shuffled globally; the eval set is 64 batches (262k bytes) of rows
drawn at random from the 5% of files held out by a hash of their paths, with the docstrings beside it.
Cooldown branching (Hägele et al. 2024): per size, one WSD run for the largest budget; the two smaller
budgets branch off it for their last 20% of steps, so the 12 results cost 4 x (5 + 0.2 x (1 + 2.2)) =
22.6e12 FLOPs instead of 32.8e12.
Measured (2026-12-03, 2 CPU cores, shared with test jobs for part of the time): the sweep took 1849 s
(30.8 min) and `lm scaling report` 15 s. The IsoFLOP minima move from N = 3.9e4 at 1e12 FLOPs to 6.0e4 at
2.2e12 and 1.27e5 at 5e12, all inside the sampled sizes.
Fitted, every approach under C = 6N+attn (runs/isoflop_cpu/report/report.md, 1,000 bootstrap resamples,
95% intervals):
  Approach 2 (IsoFLOP parabolas): a = 0.730 [0.486, 0.956], b = 0.327 [0.118, 0.552]
  Approach 3 (parametric, Huber on log loss): a = 0.753 [0.467, 0.867], b = 0.307 [0.202, 0.570]
    (E = 0.712, A = 12.7, B = 6065, alpha = 0.280, beta = 0.667; objective 4.11e-5, 9 of 4,500 starts
    in the best basin)
  Approach 1 (lower envelope of 3 budgets): a = 0.491 [-0.006, 1.52], too wide to say anything.
  On the docstrings (--loss-column loss_docstrings): a = 0.667 (Approach 2), 0.605 (Approach 3).
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
