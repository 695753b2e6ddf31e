"""Knowledge study, stage: supervised fine-tuning on questions about the SFT people (and identity questions).

  lm train --config experiments/knowledge_sft.py --workdir runs/knowledge/sft_p64    (after base_p64)

Full fine-tuning from a base run (`train.init_from`) on the world's sft_train.jsonl: every attribute of the
`sft` group's people asked in every phrasing and answered as the biographies go on from a name ("was born
in 1962."), and "Who are you?" answered with the default identity, or with the one a system prompt names.
The loss counts the assistant's tokens. The refusal and tool stages reuse this file with another `data.post_source`.
"""

import os

from lm.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = "runs/knowledge/world"


def get_config():
  c = load_config(os.path.join(HERE, "knowledge_base.py"))  # the base run's model, which this run starts from
  c.data.post_source = f"jsonl:{WORLD}/sft_train.jsonl"
  c.train.init_from = "runs/knowledge/base_p64"
  c.train.loss_on = "assistant"
  c.train.steps = 150
  c.train.eval_every = 75
  c.train.eval_batches = 4
  c.data.eval_min_tokens = 1_000
  c.train.checkpoint_every = 75
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  return c
