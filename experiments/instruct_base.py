"""Post-training chain, stage 1: a base model pre-trained on the instruction world's plain Q/A text.

  lm study --config experiments/instruct.py --workdir runs/instruct     (the whole chain), or alone:
  lm train --config experiments/instruct_base.py --workdir runs/instruct/base

The world (lm/worlds/instructions.py, written by the study's first stage into runs/instruct/world) has
5,000 documents of `Q: <instruction>\\nA: <answer>` blocks, 2.3 MB. A byte-level 4-layer decoder (d_model
128) reads them for 400 steps of 32 x 128 bytes (1.6M bytes, about 0.7 epochs). It knows the tasks but has
never seen the chat markers: prompted with the chat template it answers poorly (README, "Post-training").
"""

from lm.config import default_config

WORLD = "runs/instruct/world"  # where `lm study` writes it; the study passes the paths of its own workdir


def get_config():
  c = default_config()
  c.data.source = f"jsonl:{WORLD}/pretrain.jsonl"
  c.data.seq_len = 128
  c.data.eval_fraction = 0.02
  c.data.eval_min_tokens = 10_000
  c.tokenizer.kind = "byte"
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 384
  c.train.batch_size = 32
  c.train.steps = 1000
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.train.eval_next_train_batches = False
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 40
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.1
  return c
