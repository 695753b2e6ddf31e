"""Post-training chain, stage 2: supervised fine-tuning of the base model on chat conversations.

  lm train --config experiments/instruct_sft.py --workdir runs/instruct/sft   (after the base stage)

Full fine-tuning from the base run's newest checkpoint (`train.init_from`) on 10,000 conversations of the
instruction world, each a user instruction and an assistant answer in one of three styles, packed into
rows of 128 bytes; the loss counts the assistant's tokens and its end-of-turn token only.
"""

import os

from lm.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = "runs/instruct/world"


def get_config():
  c = load_config(os.path.join(HERE, "instruct_base.py"))  # the base run's model, which this run starts from
  c.data.post_source = f"jsonl:{WORLD}/sft_train.jsonl"
  c.data.post_eval_source = f"jsonl:{WORLD}/sft_eval.jsonl"
  c.train.init_from = "runs/instruct/base"
  c.train.loss_on = "assistant"
  c.train.steps = 400
  c.train.eval_every = 100
  c.train.eval_batches = 10  # all 500 held-out conversations
  c.data.eval_min_tokens = 5_000  # their assistant tokens: about 8,600
  c.train.checkpoint_every = 100
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  return c
