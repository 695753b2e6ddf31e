"""On a TPU or GPU host only: the fused attention the device runs equals lm's XLA attention, and the benches
report MFU against the device's data-sheet peak. On CPU machines (CI) every test here is skipped; the CPU
suite checks the same kernels in Pallas interpret mode (kernels_test.py) and compiled for TPUs (plan_test.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import bench, kernels
from lm.model import _attend, attention_mask

from conftest import tiny_config

PLATFORM = jax.devices()[0].platform
pytestmark = pytest.mark.skipif(PLATFORM not in ("tpu", "gpu"), reason="needs a TPU or GPU")
B, T, H, K, E = 2, 512, 8, 4, 128


def test_the_devices_fused_attention_equals_the_xla_path_forward_and_backward():
  kind = kernels.resolve("auto", PLATFORM, T, "bfloat16", E)
  assert kind in kernels.FUSED
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, H, E)) * E**-0.5, jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((B, T, K, E)), jnp.bfloat16) for _ in range(2))
  segments = jnp.asarray(np.where(np.arange(T) < 300, 1, 2)[None].repeat(B, 0), jnp.int32)

  def xla(q, k, v):  # lm.model's heads-major layout: [B, K, G * T, E]
    q_BxKxNxE = q.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4).reshape(B, K, H // K * T, E)
    out = _attend(q_BxKxNxE, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), attention_mask(segments), "bfloat16")
    return out.reshape(B, K, H // K, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)

  def fused(q, k, v):
    return kernels.attention(kind, q, k, v, segments)

  weights = jnp.asarray(rng.standard_normal((B, T, H, E)), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

  np.testing.assert_allclose(
    np.asarray(fused(q, k, v), np.float32), np.asarray(xla(q, k, v), np.float32), atol=2e-2, rtol=2e-2
  )
  got, want = (jax.grad(loss(fn), (0, 1, 2))(q, k, v) for fn in (fused, xla))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=5e-2, rtol=5e-2)


def test_bench_train_and_sample_report_mfu_against_the_data_sheet_peak():
  cfg = tiny_config(**{"data.seq_len": 256, "model.dtype": "bfloat16", "mesh.data": -1})
  record = bench.train_step_throughput(cfg, steps=3, warmup=1)
  assert record["peak_from"].startswith("data sheet") and 0 < record["mfu"] < 1
  assert record["attention"] == kernels.resolve("auto", PLATFORM, 256, "bfloat16", 8)
  sample = bench.sample_throughput(cfg, prompt_len=16, new_tokens=16)
  assert sample["peak_from"].startswith("data sheet") and 0 < sample["batch8_decode_mfu"] < 1
