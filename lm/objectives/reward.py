"""A reward model (`train.objective = "reward"`): a scalar score of a conversation, trained on preference pairs.

The model is the Transformer with `head="scalar"` (a zero-initialised score per position); a row's reward is
the score at its last real token (`lm.model.last_token`), which has read the whole prompt and response. The
loss is the Bradley-Terry loss of each pair's rewards (`lm.preference.bradley_terry_loss`), with the pair's
`margin` from the data and `reward.center_coef`; at the zero head every reward is 0 and the loss is ln 2.
`train.init_from` (optional) starts the trunk from a language model's run (an SFT run, typically); its LM
head is dropped and the score head starts at zero.

Data: `data.post_source` of preference pairs (`lm.data.post`); a batch of P pairs is 2P rows, the chosen
response of pair p in row 2p and the rejected one in row 2p + 1. Metrics, as train/NAME and, on the held-out
pairs, eval/NAME: loss, rewards/accuracy (the chosen reward higher; a tie half), rewards/margin (mean chosen -
rejected reward), rewards/mean, rewards/chosen, rewards/rejected; eval/pairs counts the held-out pairs.
`lm reward` (`lm.reward_cli`) scores conversations and pairs with a trained run.
"""

import dataclasses

import jax.numpy as jnp

from lm.model import last_token
from lm.objectives.posttrain import Pairs
from lm.preference import bradley_terry_loss, pair_weights, split_pairs


class Reward(Pairs):
  """Bradley-Terry reward modelling on preference pairs."""

  def model_config(self, model_cfg):
    return dataclasses.replace(model_cfg, head="scalar")

  def make_loss(self, model):
    center_coef = self.cfg.reward.center_coef

    def loss(params, batch, rng, frozen):
      del frozen
      r_B = rewards(model, params, batch)
      weights_P = pair_weights(batch["segment_ids"])
      chosen_P, rejected_P = split_pairs(r_B)
      margin_P, _ = split_pairs(batch["margin"])
      mean, metrics = bradley_terry_loss(chosen_P, rejected_P, margin_P, center_coef, weights_P)
      pairs = jnp.sum(weights_P)
      return mean * pairs, pairs, {name: value * pairs for name, value in metrics.items()}

    return loss


def rewards(model, params, batch: dict):
  """Each row's reward [B] f32: the scalar head's score at the row's last real token."""
  scores_BxT = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
  return last_token(scores_BxT, batch["segment_ids"])
