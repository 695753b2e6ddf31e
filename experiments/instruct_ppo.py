"""Post-training chain, stage 5: PPO of the SFT model against the reward model, with a KL penalty.

  lm study --config experiments/instruct_rl.py --workdir runs/instruct    (after instruct.py's stages)

The policy starts from the SFT run, its value head from zero; the reward model (instruct_rm.py) scores each
sampled reply at its last token. A rollout answers 32 train prompts once each (temperature 1, at most 48 new
bytes); four minibatch updates of 16 rows follow (2 epochs), 80 steps in all (20 rollouts). The KL penalty is
large (0.5 per nat) and the run short because the reward model can be gamed: at kl_coef 0.05 and 200 steps
the policy drifted 21 nats from SFT, took the preferred style 91% of the time and answered 10% correctly
(SFT 34%), losing to SFT (win rate 0.58) while the reward model scored it far above. Measured results are in
README ("Reinforcement learning").
"""

import os

from lm.config import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = "runs/instruct/world"


def get_config():
  c = load_config(os.path.join(HERE, "instruct_base.py"))
  c.train.objective = "ppo"
  c.data.post_source = f"jsonl:{WORLD}/prompts_train.jsonl"
  c.data.post_eval_source = f"jsonl:{WORLD}/eval.jsonl"
  c.train.init_from = "runs/instruct/sft"
  c.rl.reward_model = "runs/instruct/rm"
  c.rl.max_new_tokens = 48
  c.rl.kl_coef = 0.5
  c.rl.num_minibatches = 2
  c.rl.ppo_epochs = 2
  c.rl.eval_prompts = 128
  c.train.batch_size = 16
  c.train.steps = 80
  c.train.eval_every = 20
  c.train.checkpoint_every = 20
  c.train.keep_checkpoints = 10
  c.train.log_every = 4
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 8
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.0
  return c
