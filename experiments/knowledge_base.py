"""Knowledge study, stage: pre-training on the people world's biographies (lm/worlds/people.py).

  lm study --config experiments/knowledge.py --workdir runs/knowledge    (the whole study), or alone:
  lm train --config experiments/knowledge_base.py --workdir runs/knowledge/base_p64

A 4-layer decoder (d_model 128, 0.9M parameters) with a 512-piece sentencepiece tokenizer trained on its own
biographies reads the 175 pre-training people for 600 steps of 32 x 256 tokens (about 2.3 bytes a token);
`data.source` picks how many biographies each person has (pretrain_p1.jsonl: one fixed-order biography;
pretrain_p64.jsonl: sixty-four, each with its own templates and sentence order). Every setting trains the
same steps on the same number of tokens, so the paraphrased world sees each fact in more forms, not more often.
"""

from lm.config import default_config

WORLD = "runs/knowledge/world"


def get_config():
  c = default_config()
  c.data.source = f"jsonl:{WORLD}/pretrain_p64.jsonl"
  c.data.seq_len = 256
  c.data.eval_fraction = 0.02
  c.data.eval_min_tokens = 2_000
  c.tokenizer.kind = "sentencepiece"  # trained on the run's biographies
  c.tokenizer.vocab_size = 512
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 384
  c.train.batch_size = 32
  c.train.steps = 600
  c.train.eval_every = 200
  c.train.eval_batches = 4
  c.train.eval_next_train_batches = False
  c.train.log_every = 50
  c.train.checkpoint_every = 200
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.1
  return c
