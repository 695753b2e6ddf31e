"""Post-training chain, stage 3: a reward model trained on preference pairs, started from the SFT run.

  lm train --config experiments/instruct_rm.py --workdir runs/instruct/rm   (after the SFT stage)

The SFT model's trunk with a scalar head (zero at the start, so the loss starts at ln 2), trained with
the Bradley-Terry loss on 5,000 pairs ranked by the world's hidden rule: a correct answer beats a wrong
one, and among correct ones `The answer is X.` beats the other two styles.
"""

import os

from lm.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = "runs/instruct/world"


def get_config():
  c = load_config(os.path.join(HERE, "instruct_base.py"))
  c.train.objective = "reward"
  c.data.post_source = f"jsonl:{WORLD}/prefs_train.jsonl"
  c.data.post_eval_source = f"jsonl:{WORLD}/prefs_eval.jsonl"
  c.train.init_from = "runs/instruct/sft"
  c.train.steps = 200
  c.train.eval_every = 100
  c.train.eval_batches = 32  # all 500 held-out pairs, 16 a batch
  c.train.checkpoint_every = 100
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  return c
