"""Parameter counts and training-FLOP conventions, shared by MFU, plots and scaling fits.

N counts every parameter that a token's forward pass multiplies: all transformer-block
weights, the final norm and the output head (the tied embedding, if tied). In a mixture of experts that is
the active parameters: the router, the K experts a token is routed to and any shared ones. The input
embedding is a lookup, not a matmul, so it is left out of N unless the head is tied to it.
LoRA adapters count in N (every token multiplies them); a scalar head (a reward model's) is D
parameters. `trainable_params` counts what training updates: all of N and the embedding, or a
LoRA run's adapters (and new scalar head) only.

Training FLOPs per token, forward + backward = 3x forward, with 2 FLOPs per multiply-add:
- `6N`: 6 * N, the Kaplan et al. / Chinchilla rule of thumb.
- `6N+attn`: 6 * N + 12 * L * T * D. The attention score and value matmuls cost 2 * T * D
  each per token and layer in the forward pass; this counts all T keys, the causally masked
  half included, as a dense kernel computes it. This is the default; it is within 10% of XLA's compiled
  cost analysis up to 256 tokens (tested), and above what the blocked kernel computes (below).
- `6N+attn_causal`: 6 * N + 6 * L * T * D, counting only the unmasked half, as Kaplan et al.
- `6N_nohead`, `6N_nohead+attn`, `6N_nohead+attn_causal`: the same without the last layer (the output
  head), i.e. with Kaplan et al.'s non-embedding N; Porian et al. (2024) show this choice moves the exponents.

The conventions are for accounting (budgets, scaling fits), and fixed per run. What the train step really
computes is `flops_per_token_computed`: the matmuls only, with attention over the causal query blocks of
`lm.model.query_blocks`, in which each block of 128 queries reads the keys up to its own end. For rows of
256 or more tokens in whole blocks it is below `6N+attn` (by 37.5% of the attention at 512 tokens); for
other lengths, one block, the attention is the same.
"""

import time

import numpy as np

CONVENTIONS = ("6N", "6N+attn", "6N+attn_causal", "6N_nohead", "6N_nohead+attn", "6N_nohead+attn_causal")


def lora_params(model_cfg) -> int:
  """Parameters of the LoRA adapters of a `ModelConfig`: R * (in + out) per adapted projection and layer."""
  c = model_cfg
  d, f, q, kv = c.d_model, c.d_ff, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
  sizes = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w_gate": (d, f), "w_up": (d, f), "w_down": (f, d)}
  return c.n_layers * c.lora_rank * sum(sum(sizes[name]) for name in c.lora_targets)


def _moe_layers(model_cfg) -> int:
  return sum(model_cfg.moe.is_moe_layer(i) for i in range(model_cfg.n_layers))


def param_counts(model_cfg) -> dict[str, int]:
  """Total, active, embedding, head and non-embedding parameter counts of a `ModelConfig`.

  LoRA adapters count in the blocks; the scalar head (head="scalar") is D parameters, an LM head V * D.
  An MoE layer holds a router (D * X), X experts and any shared ones; a token uses the router, K experts
  and the shared ones. `active` and `flop_params` (N) count what a token uses; `total`, `non_embedding` and
  `flop_params_total` count every expert. A dense model's active and total counts are equal.
  """
  c, moe = model_cfg, model_cfg.moe
  d, e = c.d_model, c.head_dim
  attn = d * c.n_heads * e * 2 + d * c.n_kv_heads * e * 2
  moe_layers = _moe_layers(c)
  dense_layers = c.n_layers - moe_layers
  expert = 3 * d * moe.expert_d_ff(c.d_ff)
  moe_fixed = d * moe.experts + moe.shared_experts * expert  # router and shared experts
  blocks = c.n_layers * (attn + 2 * d) + dense_layers * 3 * d * c.d_ff + moe_layers * moe_fixed
  inactive = moe_layers * (moe.experts - moe.top_k) * expert
  routed = moe_layers * moe.experts * expert
  embedding = c.vocab_size * d
  head_matmul = d if c.head == "scalar" else c.vocab_size * d
  head = 0 if c.tie_embeddings and c.head == "lm" else head_matmul
  non_embedding = blocks + routed + lora_params(c) + d  # + final norm
  return {
    "total": non_embedding + embedding + head,
    "active": non_embedding + embedding + head - inactive,
    "embedding": embedding,
    "head": head,
    "non_embedding": non_embedding,
    "non_embedding_active": non_embedding - inactive,
    "flop_params": non_embedding - inactive + head_matmul,  # what each token multiplies: blocks + head
    "flop_params_total": non_embedding + head_matmul,  # the same with every expert: an MoE model's dense size
  }


def trainable_params(model_cfg) -> int:
  """The parameters training updates: all of them, or with LoRA (lora_rank > 0) the adapters and a scalar
  head (`lm.lora.lora_mask`)."""
  c = model_cfg
  if not c.lora_rank:
    return param_counts(c)["total"]
  return lora_params(c) + (c.d_model if c.head == "scalar" else 0)


def flops_per_token(model_cfg, seq_len: int, convention: str = "6N+attn") -> float:
  """Training FLOPs per token (forward + backward) under a named convention."""
  if convention not in CONVENTIONS:
    raise ValueError(f"unknown FLOP convention {convention!r}; known: {CONVENTIONS}")
  counts = param_counts(model_cfg)
  n = counts["non_embedding_active"] if convention.startswith("6N_nohead") else counts["flop_params"]
  attn = 12 * model_cfg.n_layers * seq_len * model_cfg.d_model
  if convention.endswith("+attn"):
    return 6.0 * n + attn
  if convention.endswith("+attn_causal"):
    return 6.0 * n + attn / 2
  return 6.0 * n


def flops_per_token_computed(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward) of the matmuls the train step computes for rows of `seq_len`.

  Each weight matrix costs 6 FLOPs per element and token (norm weights are not matmuls). Attention, per layer,
  query block [lo, hi) and query head, costs 2 FLOPs per (query, key, head_dim) for each of its 6 matmuls
  (scores and values forward; their 4 gradients), over keys [0, hi) only. Rematerialisation's recomputed
  forward pass (`model.remat`) is not counted, as MFU does not count it.

  With LoRA (lora_rank > 0) the step is taken to differentiate the trained parameters only (`lm.lora`): each
  weight costs 2 FLOPs forward and 2 for its input's gradient, and only trained ones 2 more for their own
  gradient; the first layer's q, k and v projections read the frozen embedding, whose gradient nothing needs.
  """
  from lm.model import query_blocks  # noqa: PLC0415 (keeps `lm.flops` importable without JAX)

  c = model_cfg
  counts = param_counts(c)
  norms = c.n_layers * 2 * c.d_model + c.d_model
  query_key_pairs = sum((hi - lo) * hi for lo, hi in query_blocks(seq_len))
  attn = 12 * c.n_layers * c.n_heads * c.head_dim * query_key_pairs / seq_len
  matmuls = counts["flop_params"] - norms
  if c.moe.experts:
    # Dense dispatch computes every slot, filled or not: X * C / S expert passes per token, not K; and its
    # dispatch einsum (forward, input gradient) and combine einsum (forward and both gradients) X * C * D each.
    s = c.moe.group_tokens(seq_len)
    slots = c.moe.experts * c.moe.capacity(s)
    expert = 3 * c.d_model * c.moe.expert_d_ff(c.d_ff)
    matmuls += _moe_layers(c) * (slots / s - c.moe.top_k) * expert
    attn += _moe_layers(c) * 10 * slots * c.d_model
  if not c.lora_rank:
    return 6.0 * matmuls + attn
  adapted_qkv = len({"wq", "wk", "wv"} & set(c.lora_targets))
  first_qkv = c.d_model * ((c.n_heads + 2 * c.n_kv_heads) * c.head_dim + adapted_qkv * c.lora_rank)
  return 4.0 * matmuls + 2.0 * trainable_params(c) - 2.0 * first_qkv + attn


# Peak dense bf16 FLOP/s per chip, from the vendors' published figures.
TPU_PEAK_FLOPS = {
  "v4": 275e12,
  "v5e": 197e12,
  "v5 lite": 197e12,
  "v5p": 459e12,
  "v6e": 918e12,
  "v6 lite": 918e12,
}

# Dense bf16 FLOP/s per GPU (NVIDIA's data sheets, SXM parts, without sparsity), by device_kind substring.
GPU_PEAK_FLOPS = {
  "h200": 989e12,
  "h100": 989e12,
  "a100": 312e12,
  "l4": 121e12,
}

_measured_peak: dict[str, float] = {}


def accelerator_peak_flops() -> float | None:
  """The data-sheet peak of this host's TPU or GPU per device, or None (a CPU, or an unlisted device)."""
  import jax  # noqa: PLC0415 (keeps `lm.flops` importable without initialising JAX)

  device = jax.devices()[0]
  kind = device.device_kind.lower()
  table = TPU_PEAK_FLOPS if device.platform == "tpu" else GPU_PEAK_FLOPS if device.platform == "gpu" else {}
  return next((peak for name, peak in table.items() if name in kind), None)


def peak_flops_per_device(dtype: str = "float32") -> float:
  """Per-device peak FLOP/s: a table for TPUs and GPUs, a measured matmul rate elsewhere (cached)."""
  peak = accelerator_peak_flops()
  if peak is not None:
    return peak
  if dtype not in _measured_peak:
    _measured_peak[dtype] = measure_matmul_flops(dtype)
  return _measured_peak[dtype]


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, seconds: float = 0.5) -> float:
  """Best FLOP/s of a jitted n x n matmul on the default device (all local cores)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype=dtype)
  matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  matmul(a, a).block_until_ready()
  best, start = float("inf"), time.perf_counter()
  while time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best
