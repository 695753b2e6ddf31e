"""Post-training chain, stage 6: GRPO of the SFT model with a reward a program checks.

  lm study --config experiments/instruct_rl.py --workdir runs/instruct    (after instruct.py's stages)

The reward is 1 for a correct reply and 0 otherwise (`lm.worlds.instructions:correct`, reading the answer in
each prompt record); no reward model, no critic. A rollout answers 16 train prompts 8 times each (temperature 1,
at most 48 new bytes); advantages are each reply's reward less its group's mean, over the group's std; one
update on all 128 replies follows, 400 steps in all (400 rollouts, 51,200 replies), with the KL term's weight
(beta) at 0.2. That weight is what lets a long run gain: at 0.04 the tasks with little reward signal drift
(counting, reversing) and take back what the others gain. Measured results are in README ("Reinforcement
learning").
"""

import os

from lm.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = "runs/instruct/world"


def get_config():
  c = load_config(os.path.join(HERE, "instruct_base.py"))
  c.train.objective = "grpo"
  c.data.post_source = f"jsonl:{WORLD}/prompts_train.jsonl"
  c.data.post_eval_source = f"jsonl:{WORLD}/eval.jsonl"
  c.train.init_from = "runs/instruct/sft"
  c.rl.reward_fn = "lm.worlds.instructions:correct"
  c.rl.group_size = 8
  c.rl.max_new_tokens = 48
  c.rl.kl_coef = 0.2
  c.rl.num_minibatches = 1
  c.rl.ppo_epochs = 1
  c.rl.eval_prompts = 128
  c.train.batch_size = 128
  c.train.steps = 400
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 10
  c.train.log_every = 1
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 8
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.0
  return c
