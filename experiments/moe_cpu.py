"""A mixture of experts against the dense model of the same active parameters, at equal training FLOPs.

  lm sweep --config experiments/moe_cpu.py --workdir runs/moe_cpu --no-progress

Both are 4-layer decoders of width 128 on the standard library, byte-level, batch 32 x 128, trained for
the same budget of training FLOPs (`6N+attn`, N the active parameters). The dense model's MLPs are 384
wide; the MoE model replaces every MLP with 8 routed experts of width 192, top-2 (so a token's two experts
are as wide as the dense MLP), capacity factor 1.25, plus a router: 3.4x the dense model's block
parameters, at nearly the same FLOPs per token. README ("Mixture of experts") has the measured result.
"""

from lm.config import default_config
from lm.scaling import accounting, sweep

BUDGET = 1.2e13  # training FLOPs per run


def get_config():
  c = default_config()
  c.data.source = "stdlib"
  c.data.seq_len = 128
  c.data.eval_fraction = 0.05
  c.tokenizer.kind = "byte"
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 384
  c.train.batch_size = 32
  c.train.eval_every = 100
  c.train.eval_batches = 32
  c.train.eval_next_train_batches = False
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 25
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.1
  return c


MOE = {"model.moe.experts": 8, "model.moe.top_k": 2, "model.moe.d_ff": 192, "model.moe.capacity_factor": 1.25}


def get_sweep():
  base = get_config()
  vocab = accounting.vocab_size(base)
  points = []
  for name, overrides in (("dense", {}), ("moe", MOE)):
    cfg = sweep.apply_point(base, overrides)
    per_token = accounting.accounting(cfg, vocab)["flops_per_token"][cfg.train.flops_convention]
    steps = round(BUDGET / (per_token * base.train.batch_size * base.data.seq_len))
    points.append({"id": name, **overrides, "train.steps": steps})
  return points
