"""Policy-gradient maths for PPO and GRPO: KL estimates, GAE, whitening, clipped losses, group advantages.

Pure functions of arrays, no model and no I/O. Arrays are [B, T]: B rows (sampled sequences) by T target
positions. `mask_BxT` is float32 1.0 on a row's response (the tokens the policy generated, its end-of-turn
token included: one contiguous span per row) and 0.0 on the prompt and padding. `logp` is the log-probability
of the sampled token under the policy being trained, `old_logp` under the policy that sampled it, `ref_logp`
under the frozen reference. Every returned array is float32. Per-token losses are returned unmasked;
`aggregate` masks them and turns them into the (loss_sum, normaliser) pair the train step adds over
microbatches.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

KL_ESTIMATORS = ("k1", "k3")
AGGREGATIONS = ("token_mean", "sequence_mean")


def _f32(*xs: Array) -> tuple[Array, ...]:
  """The arrays as float32 (a bfloat16 log-prob or a 0/1 int mask in, float32 maths)."""
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def kl_estimate(logp_BxT: Array, ref_logp_BxT: Array, estimator: str) -> Array:
  """Per-token estimate of KL(policy || reference) from tokens sampled from the policy -> [B, T].

  With d = ref_logp - logp = log(q(x) / p(x)) (Schulman 2020, "Approximating KL Divergence"):
  - "k1": -d = logp - ref_logp; unbiased, but negative on some tokens and of high variance;
  - "k3": exp(d) - d - 1 (as expm1(d) - d, exact for small d); unbiased too, since E_p[exp(d)] = 1, and
    never negative, since e^d >= 1 + d. The estimator GRPO's KL penalty uses (DeepSeekMath, Shao et al. 2024).
  Both are 0 where the policy and the reference agree. ValueError for an estimator not in `KL_ESTIMATORS`.
  """
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {KL_ESTIMATORS}")
  logp_BxT, ref_logp_BxT = _f32(logp_BxT, ref_logp_BxT)
  d_BxT = ref_logp_BxT - logp_BxT
  return -d_BxT if estimator == "k1" else jnp.expm1(d_BxT) - d_BxT


def gae(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, gamma: float, lam: float) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016) over each row's masked span -> (advantages,
  returns), each [B, T].

  With m the mask and V_T = m_T = 0, right to left (a `jax.lax.scan`, so it jits):
    delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
    A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
  so the episode ends after a row's last masked position (the value of what follows it is 0), and rewards
  and values outside the mask never enter. returns = A + V, the lambda-return the value head regresses to.
  Both are 0 outside the mask. With gamma = lam = 1, A_t is the reward-to-go minus V_t.
  """
  rewards_BxT, values_BxT, mask_BxT = _f32(rewards_BxT, values_BxT, mask_BxT)

  def step(carry, x):
    next_adv_B, next_value_B, next_mask_B = carry
    r_B, v_B, m_B = x
    delta_B = r_B + gamma * next_mask_B * next_value_B - v_B
    adv_B = m_B * (delta_B + gamma * lam * next_mask_B * next_adv_B)
    return (adv_B, v_B, m_B), adv_B

  zeros_B = jnp.zeros(rewards_BxT.shape[0], jnp.float32)
  xs = (rewards_BxT.T, values_BxT.T, mask_BxT.T)
  _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B, zeros_B), xs, reverse=True)
  advantages_BxT = adv_TxB.T
  return advantages_BxT, mask_BxT * (advantages_BxT + values_BxT)


def masked_mean(x_BxT: Array, mask_BxT: Array) -> Array:
  """sum(x * m) / sum(m), a scalar; 0 when the mask is empty (no 0 / 0, which would NaN the gradient too)."""
  x_BxT, mask_BxT = _f32(x_BxT, mask_BxT)
  n = jnp.sum(mask_BxT)
  return jnp.sum(x_BxT * mask_BxT) / jnp.where(n > 0, n, 1.0)


def masked_var(x_BxT: Array, mask_BxT: Array, unbiased: bool = True) -> Array:
  """The variance of the masked entries, a scalar: masked_mean((x - mean)^2), times n / (n - 1) when unbiased
  (n the number of masked entries). 0 when n is 0, or 1 and unbiased (one sample measures no spread)."""
  x_BxT, mask_BxT = _f32(x_BxT, mask_BxT)
  var = masked_mean(jnp.square(x_BxT - masked_mean(x_BxT, mask_BxT)), mask_BxT)
  if unbiased:
    n = jnp.sum(mask_BxT)
    var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), 0.0)
  return var


def whiten(x_BxT: Array, mask_BxT: Array, shift_mean: bool = True) -> Array:
  """(x - mean) / sqrt(var + 1e-8) over the masked entries (unbiased var), the mean added back when not
  shift_mean (whitening rewards rescales them but keeps their sign); 0 outside the mask -> [B, T]."""
  x_BxT, mask_BxT = _f32(x_BxT, mask_BxT)
  mean = masked_mean(x_BxT, mask_BxT)
  whitened_BxT = (x_BxT - mean) * jax.lax.rsqrt(masked_var(x_BxT, mask_BxT) + 1e-8)
  if not shift_mean:
    whitened_BxT = whitened_BxT + mean
  return mask_BxT * whitened_BxT


def policy_loss(
  logp_BxT: Array, old_logp_BxT: Array, advantages_BxT: Array, cliprange: float
) -> tuple[Array, Array, Array]:
  """PPO's clipped surrogate (Schulman et al. 2017), per token and unmasked -> (loss, clipped, approx_kl).

  ratio = exp(logp - old_logp); loss = max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)): the pessimistic of
  the two, so a token whose ratio has already moved past 1 +- c in the advantage's direction gets no
  gradient. clipped = 1.0 where the clipped term is strictly the larger (TRL's clipfrac); approx_kl =
  0.5 * (logp - old_logp)^2, the k2 estimate of KL(old || new) that PPO logs.
  """
  logp_BxT, old_logp_BxT, advantages_BxT = _f32(logp_BxT, old_logp_BxT, advantages_BxT)
  log_ratio_BxT = logp_BxT - old_logp_BxT
  ratio_BxT = jnp.exp(log_ratio_BxT)
  unclipped_BxT = -advantages_BxT * ratio_BxT
  clipped_loss_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1.0 - cliprange, 1.0 + cliprange)
  loss_BxT = jnp.maximum(unclipped_BxT, clipped_loss_BxT)
  clipped_BxT = (clipped_loss_BxT > unclipped_BxT).astype(jnp.float32)
  return loss_BxT, clipped_BxT, 0.5 * jnp.square(log_ratio_BxT)


def value_loss(
  values_BxT: Array, old_values_BxT: Array, returns_BxT: Array, cliprange_value: float
) -> tuple[Array, Array]:
  """PPO's clipped value loss, per token and unmasked -> (loss, clipped).

  v_clipped = old + clip(values - old, -c, c); loss = 0.5 * max((values - R)^2, (v_clipped - R)^2);
  clipped = 1.0 where the clipped square is strictly the larger (TRL's vf_clipfrac).
  """
  values_BxT, old_values_BxT, returns_BxT = _f32(values_BxT, old_values_BxT, returns_BxT)
  v_clipped_BxT = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -cliprange_value, cliprange_value)
  square_BxT = jnp.square(values_BxT - returns_BxT)
  clipped_square_BxT = jnp.square(v_clipped_BxT - returns_BxT)
  clipped_BxT = (clipped_square_BxT > square_BxT).astype(jnp.float32)
  return 0.5 * jnp.maximum(square_BxT, clipped_square_BxT), clipped_BxT


def group_advantages(rewards_N: Array, group_size: int, scale: bool = True, eps: float = 1e-4) -> Array:
  """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath) of N = P * G rewards, G per prompt -> [N].

  Rows g*G .. g*G + G - 1 are the G responses to one prompt. A = r - mean_g, divided by (std_g + eps) when
  scale. std_g is the population std (ddof=0); TRL's GRPOTrainer takes torch's default, the sample std
  (ddof=1), which is sqrt(G / (G - 1)) times larger. A group whose rewards are all equal gets 0s.
  scale=False is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): dividing by the std
  weights prompts that are nearly always or nearly never solved the most.
  """
  (rewards_N,) = _f32(rewards_N)
  assert rewards_N.shape[0] % group_size == 0, (rewards_N.shape, group_size)
  rewards_PxG = rewards_N.reshape(-1, group_size)
  advantages_PxG = rewards_PxG - jnp.mean(rewards_PxG, axis=1, keepdims=True)
  if scale:
    advantages_PxG = advantages_PxG / (jnp.std(rewards_PxG, axis=1, keepdims=True) + eps)
  return advantages_PxG.reshape(-1)


def aggregate(loss_BxT: Array, mask_BxT: Array, mode: str) -> tuple[Array, Array]:
  """A per-token loss as (loss_sum, normaliser), scalars that add over microbatches; the loss is their ratio.

  - "token_mean": (sum(loss * m), sum(m)), the mean over every response token of the batch;
  - "sequence_mean": (sum over rows with a masked token of sum_t(loss * m) / sum_t(m), the count of those
    rows), the mean over responses of each one's token mean (GRPO as published): a long response weighs
    as much as a short one. Rows with an empty mask count in neither.
  ValueError for a mode not in `AGGREGATIONS`.
  """
  if mode not in AGGREGATIONS:
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {AGGREGATIONS}")
  loss_BxT, mask_BxT = _f32(loss_BxT, mask_BxT)
  sums_B, counts_B = jnp.sum(loss_BxT * mask_BxT, axis=1), jnp.sum(mask_BxT, axis=1)
  if mode == "token_mean":
    return jnp.sum(sums_B), jnp.sum(counts_B)
  has_tokens_B = counts_B > 0
  return jnp.sum(sums_B / jnp.where(has_tokens_B, counts_B, 1.0)), jnp.sum(has_tokens_B.astype(jnp.float32))


def entropy(logits_BxTxV: Array) -> Array:
  """The entropy of softmax(logits) in nats, -sum_v p_v log p_v from log_softmax -> [B, T]. A logit of -inf
  (a token masked out) adds 0, not 0 * -inf = NaN."""
  logp_BxTxV = jax.nn.log_softmax(jnp.asarray(logits_BxTxV, jnp.float32), axis=-1)
  p_BxTxV = jnp.exp(logp_BxTxV)
  return -jnp.sum(p_BxTxV * jnp.where(p_BxTxV > 0, logp_BxTxV, 0.0), axis=-1)


def explained_variance(values_BxT: Array, returns_BxT: Array, mask_BxT: Array) -> Array:
  """1 - var(returns - values) / var(returns) over the masked entries, a scalar: 1 for a perfect value head,
  0 for one that predicts the mean, negative for worse. 0 when var(returns) is 0 (nothing to explain)."""
  values_BxT, returns_BxT, mask_BxT = _f32(values_BxT, returns_BxT, mask_BxT)
  var_returns = masked_var(returns_BxT, mask_BxT, unbiased=False)
  var_residual = masked_var(returns_BxT - values_BxT, mask_BxT, unbiased=False)
  return jnp.where(var_returns > 0, 1.0 - var_residual / jnp.where(var_returns > 0, var_returns, 1.0), 0.0)
