"""IsoFLOP study at pod scale: budgets 1e17 to 1e20 FLOPs, sentencepiece 32k on a TFDS corpus.

  lm sweep --config experiments/isoflop_tpu.py --workdir gs://BUCKET/isoflop_tpu --print-commands
  lm scaling report gs://BUCKET/isoflop_tpu --budget 1e21

Sizes come from a 9-rung ladder (1e7 to 3.2e9 parameters), kept within 1 to 300 tokens per parameter at
each budget. Shapes follow the ladder rules of `lm.scaling.sweep` (d_model = 64 x n_layers, head_dim 128);
each run trains for C / (FLOPs per token x 256 x 2048 tokens) steps under `6N+attn`, with lr 3e-4 at
d_model 1024 scaled as 1/d_model. Cooldown branching (Hägele et al. 2024): per size, one WSD run for its
largest budget, from which the smaller budgets branch off for their last 20% of steps.
`--print-commands` prints the `lm train` lines in order for a cluster launcher: a branch's source appears
once per branch, stopped (train.stop_at_step) at the step the branch starts from, then in full.
"""

from lm.config import default_config
from lm.scaling import accounting, sweep

BUDGETS = (1e17, 1e18, 1e19, 1e20)
SIZES = (1e7, 2e7, 5e7, 1e8, 2e8, 4e8, 8e8, 1.6e9, 3.2e9)
VOCAB = 32_000


def get_config():
  c = default_config()
  c.data.source = "tfds:c4/en:3.1.0"
  c.data.seq_len = 2048
  c.tokenizer.kind = "sentencepiece"
  c.tokenizer.vocab_size = VOCAB
  c.model.d_model = 1024
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.model.remat = "dots"
  c.train.batch_size = 256
  c.train.eval_every = 1000
  c.train.eval_batches = 32
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.optim.lr = 3e-4
  c.mesh.fsdp = -1
  c.mesh.data = 1
  return c


def get_sweep():
  shapes = sweep.size_ladder(list(SIZES), VOCAB, aspect=64, head_dim=128)
  points = sweep.isoflop_grid(get_config(), list(BUDGETS), shapes, VOCAB)
  kept = [p for p in points if 1 <= tokens_per_param(p) <= 300]  # the window around each budget's optimum
  return sweep.cooldown_branches(kept)


def tokens_per_param(point: dict) -> float:
  """D / N of a point of this study."""
  cfg = sweep.apply_point(get_config(), point)
  n = accounting.accounting(cfg, VOCAB)["params"]["flop_params"]
  return point["train.steps"] * cfg.train.batch_size * cfg.data.seq_len / n
