"""Preference losses: sequence log-probabilities, the Bradley-Terry reward-model loss and DPO and its variants.

Pure functions of arrays, no I/O. A preference batch holds P pairs as 2P rows of the common batch format,
one right-padded sequence per row: the chosen response of pair p in row 2p, the rejected one in row 2p + 1
(`split_pairs`). A pair whose rows hold no sequence (padding rows, segment_ids all 0) weighs nothing
(`pair_weights`). Losses and metrics are means over pairs weighted so, and an objective's sums over a
microbatch are these times the sum of the weights.

Accuracies count a tie as half right: a pair the model cannot tell apart is a coin flip, so a policy equal
to its reference (all DPO rewards 0) or a zero reward head scores 0.5.
"""

import jax
import jax.numpy as jnp

from lm.model import LOSS_CHUNKS, cross_entropy

Array = jax.Array

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def split_pairs(x_B: Array) -> tuple[Array, Array]:
  """Rows [2P, ...] -> (chosen rows 0::2, rejected rows 1::2), each [P, ...]."""
  pairs_Px2 = x_B.reshape(x_B.shape[0] // 2, 2, *x_B.shape[1:])
  return pairs_Px2[:, 0], pairs_Px2[:, 1]


def pair_weights(segment_ids_BxT: Array) -> Array:
  """[P] f32: 1 for a pair whose two rows hold a sequence, 0 for a padding pair (its rows' segment ids all 0)."""
  real_B = jnp.any(segment_ids_BxT > 0, axis=1)
  chosen_P, rejected_P = split_pairs(real_B)
  return (chosen_P & rejected_P).astype(jnp.float32)


def _mean(x_P: Array, weights_P: Array | None) -> Array:
  """The mean of x over pairs weighted by `weights_P` (None: all 1); 0 if every weight is 0."""
  if weights_P is None:
    return jnp.mean(x_P)
  total = jnp.sum(weights_P)
  return jnp.sum(weights_P * x_P) / jnp.where(total > 0, total, 1.0)  # no 0 / 0, which NaNs the gradient too


def sequence_logps(logits_BxTxV: Array, targets_BxT: Array, loss_mask_BxT: Array) -> Array:
  """Sum over positions where loss_mask is 1 of log p(target) -> [B], f32.

  log p = logit[target] - logsumexp(logits) (`lm.model.cross_entropy`): a gather, with no [B, T, V]
  log-softmax kept beside the logits.
  """
  ce_BxT, _ = cross_entropy(logits_BxTxV.astype(jnp.float32), targets_BxT)
  return -jnp.sum(ce_BxT * loss_mask_BxT, axis=1)


def hidden_sequence_logps(
  x_BxTxD: Array, head_DxV: Array, targets_BxT: Array, loss_mask_BxT: Array, dtype: str = "float32"
) -> Array:
  """`sequence_logps` of the logits x @ head (`Transformer(..., return_hidden=True)`) -> [B], never holding
  the [B, T, V] logits: they are made `LOSS_CHUNKS` chunks of positions at a time, and made again in the
  backward pass (rematerialised) instead of being kept for it."""
  b, t, _ = x_BxTxD.shape
  n = max(c for c in range(1, min(t, LOSS_CHUNKS) + 1) if t % c == 0)

  @jax.checkpoint
  def chunk(x_BxCxD, head_DxV, targets_BxC, loss_mask_BxC):
    logits_BxCxV = jnp.einsum(
      "bcd,dv->bcv", x_BxCxD.astype(dtype), head_DxV.astype(dtype), preferred_element_type=jnp.float32
    )
    return sequence_logps(logits_BxCxV, targets_BxC, loss_mask_BxC)

  bounds = [(i * t // n, (i + 1) * t // n) for i in range(n)]
  logps = [chunk(x_BxTxD[:, lo:hi], head_DxV, targets_BxT[:, lo:hi], loss_mask_BxT[:, lo:hi]) for lo, hi in bounds]
  return sum(logps[1:], logps[0])


def _accuracy(a_P: Array, b_P: Array, weights_P: Array | None) -> Array:
  """The fraction of pairs with a > b, a tie counting half."""
  return _mean(jnp.where(a_P > b_P, 1.0, jnp.where(a_P == b_P, 0.5, 0.0)), weights_P)


def bradley_terry_loss(
  r_chosen_P: Array,
  r_rejected_P: Array,
  margin_P: Array | float = 0.0,
  center_coef: float = 0.0,
  weights_P: Array | None = None,
) -> tuple[Array, dict]:
  """Reward-model loss of P pairs of scalar rewards -> (loss, metrics).

  loss = mean_p[-log sigmoid(r_c - r_r - m)] + center_coef * mean_p[(r_c + r_r)^2]
  - the Bradley-Terry likelihood of the preferences (Ouyang et al. 2022, InstructGPT), with Llama 2's
    margin m (Touvron et al. 2023): a pair labelled as more clearly preferred must be won by at least m;
  - reward centering (Eisenstein et al. 2023, "Helping or Herding?"; TRL's center_rewards_coefficient):
    the loss above depends only on r_c - r_r, and this term pins the free offset near 0, per pair.
  Means are weighted by `weights_P` (`pair_weights`; None: every pair 1). At zero rewards and margins the
  loss is ln 2.
  Metrics: rewards/accuracy (r_c > r_r, a tie half), rewards/margin (mean r_c - r_r), rewards/mean (mean of
  all 2P rewards), rewards/chosen, rewards/rejected (means).
  """
  diff_P = r_chosen_P - r_rejected_P
  loss = _mean(-jax.nn.log_sigmoid(diff_P - margin_P), weights_P)
  if center_coef:
    loss = loss + center_coef * _mean(jnp.square(r_chosen_P + r_rejected_P), weights_P)
  metrics = {
    "rewards/accuracy": _accuracy(r_chosen_P, r_rejected_P, weights_P),
    "rewards/margin": _mean(diff_P, weights_P),
    "rewards/mean": 0.5 * _mean(r_chosen_P + r_rejected_P, weights_P),
    "rewards/chosen": _mean(r_chosen_P, weights_P),
    "rewards/rejected": _mean(r_rejected_P, weights_P),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def dpo_loss(
  pi_chosen_P: Array,
  pi_rejected_P: Array,
  ref_chosen_P: Array,
  ref_rejected_P: Array,
  beta: float,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
  weights_P: Array | None = None,
) -> tuple[Array, dict]:
  """Direct preference loss of P pairs of sequence log-probs (`sequence_logps`) under the policy (pi) and the
  frozen reference (ref) -> (loss, metrics).

  With h = (pi_c - ref_c) - (pi_r - ref_r), the difference of the two log-ratios, the loss is the mean over
  pairs of
  - "sigmoid", DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with conservative label
    smoothing eps (cDPO, Mitchell 2023: each label is wrong with probability eps):
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); ln 2 when the policy is the reference;
  - "ipo", IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences"): (h - 1 / (2 beta))^2, regressing h to 1 / (2 beta) instead of pushing it to infinity.
    h is built from whatever log-probs are passed: sums, as `sequence_logps` gives (TRL averages them
    over tokens for IPO);
  - "hinge", SLiC (Zhao et al. 2023, "SLiC-HF"): relu(1 - beta h).
  label_smoothing applies to "sigmoid" only (ValueError otherwise, and for an unknown loss_type). Means are
  weighted by `weights_P` (`pair_weights`; None: every pair 1).
  Metrics, as TRL names them (means over pairs): rewards/chosen = beta (pi_c - ref_c), rewards/rejected =
  beta (pi_r - ref_r), rewards/accuracy (chosen reward > rejected, a tie half), rewards/margin (chosen -
  rejected reward), logps/chosen = pi_c, logps/rejected = pi_r.
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {LOSS_TYPES}")
  if label_smoothing and loss_type != "sigmoid":
    raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
  chosen_P, rejected_P = pi_chosen_P - ref_chosen_P, pi_rejected_P - ref_rejected_P
  h_P = chosen_P - rejected_P
  if loss_type == "sigmoid":
    eps = label_smoothing
    losses_P = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h_P) - eps * jax.nn.log_sigmoid(-beta * h_P)
  elif loss_type == "ipo":
    losses_P = jnp.square(h_P - 1.0 / (2.0 * beta))
  else:
    losses_P = jax.nn.relu(1.0 - beta * h_P)
  reward_chosen_P, reward_rejected_P = beta * chosen_P, beta * rejected_P
  metrics = {
    "rewards/chosen": _mean(reward_chosen_P, weights_P),
    "rewards/rejected": _mean(reward_rejected_P, weights_P),
    "rewards/accuracy": _accuracy(reward_chosen_P, reward_rejected_P, weights_P),
    "rewards/margin": _mean(reward_chosen_P - reward_rejected_P, weights_P),
    "logps/chosen": _mean(pi_chosen_P, weights_P),
    "logps/rejected": _mean(pi_rejected_P, weights_P),
  }
  return _mean(losses_P, weights_P), jax.tree.map(jax.lax.stop_gradient, metrics)
