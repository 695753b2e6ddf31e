"""IsoFLOP study on 2 CPU cores: 3 compute budgets x 4 model sizes on the standard library, byte-level.

  lm sweep --config experiments/isoflop_cpu.py --workdir runs/isoflop_cpu
  lm scaling report runs/isoflop_cpu --budget 1e14

Budgets 4e12, 8e12 and 1.6e13 training FLOPs (`6N+attn`, the training loop's convention) x models of
1 to 5 layers of width 32 x n_layers, about 1.1e5 to 1.6e6 parameters (N = blocks + head),
batch 16 x 256 bytes, cosine schedule, lr 3e-3 at d_model 128 scaled as 1/d_model, warmup N tokens.
A byte tokenizer keeps the head small, so that N can be this small and the budgets straddle N_opt.
Time estimate: `lm bench train --preset small` gives 5-7k tokens/s for the 3.6M model, about 1e11
FLOP/s; assuming half that rate for these smaller models, the 4 x 2.8e13 = 1.1e14 FLOPs take about
2,300 s, plus about 20 s of compile, eval and checkpoints per run: about 42 minutes in total.
Fitted a and b with their intervals: not run yet (fill in from `runs/isoflop_cpu/report/report.md`).
"""

from lm.config import default_config
from lm.scaling import sweep

BUDGETS = (4e12, 8e12, 1.6e13)
SIZES = (1e5, 3.5e5, 8e5, 1.6e6)
BYTE_VOCAB = 259


def get_config():
  c = default_config()
  c.data.source = "stdlib"
  c.data.seq_len = 256
  c.tokenizer.kind = "byte"
  c.model.d_model = 128
  c.train.batch_size = 16
  c.train.eval_every = 200
  c.train.eval_batches = 16
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.optim.lr = 3e-3
  c.optim.schedule = "cosine"
  return c


def get_sweep():
  shapes = sweep.size_ladder(list(SIZES), BYTE_VOCAB, aspect=32, head_dim=32)
  return sweep.isoflop_grid(get_config(), list(BUDGETS), shapes, BYTE_VOCAB)
