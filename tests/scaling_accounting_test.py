import pytest

from lm import config as config_lib
from lm.scaling import accounting

# Counts and FLOPs written out by hand from the model's weights (lm/model.py) and the conventions of lm/flops.py.
# flops_test checks the default convention against XLA's cost analysis and model_test the counts against the model.


def small_config(**overrides):
  cfg = config_lib.default_config()
  for key, value in overrides.items():
    config_lib.set_key(cfg, key, value)
  return cfg


def test_untied_grouped_query_config_by_hand():
  # Byte vocabulary V = 264, D = 32, L = 2, 4 query heads and 2 KV heads of E = 8, F = 96, T = 16.
  cfg = small_config(
    **{
      "tokenizer.kind": "byte",
      "model.d_model": 32,
      "model.n_layers": 2,
      "model.n_heads": 4,
      "model.n_kv_heads": 2,
      "model.d_ff": 96,
      "data.seq_len": 16,
      "train.flops_convention": "6N_nohead+attn_causal",
    }
  )
  attention = 32 * 4 * 8 + 32 * 2 * 8 + 32 * 2 * 8 + 4 * 8 * 32  # wq, wk, wv, wo = 1024 + 512 + 512 + 1024
  mlp = 3 * 32 * 96  # w_gate, w_up, w_down
  block = attention + mlp + 2 * 32  # + attention and MLP norm scales
  assert block == 12_352
  non_embedding = 2 * block + 32  # + final norm
  acc = accounting.accounting(cfg)
  assert accounting.vocab_size(cfg) == 256 + 8  # bytes + lm.tokenizer.SPECIAL_TOKENS
  assert acc["params"] == {
    "total": 41_632,  # 24_736 + embedding 8_448 + head 8_448
    "active": 41_632,  # dense: every parameter is active
    "embedding": 264 * 32,
    "head": 32 * 264,
    "non_embedding": non_embedding,
    "non_embedding_active": non_embedding,
    "flop_params": 33_184,  # 24_736 + head 8_448
    "flop_params_total": 33_184,
  }
  assert non_embedding == 24_736
  attn = 12 * 2 * 16 * 32  # score and value matmuls over all T keys: 12 * L * T * D = 12_288
  assert acc["flops_per_token"] == {
    "6N": 6 * 33_184,
    "6N+attn": 199_104 + attn,
    "6N+attn_causal": 199_104 + attn / 2,
    "6N_nohead": 6 * 24_736,
    "6N_nohead+attn": 148_416 + attn,
    "6N_nohead+attn_causal": 148_416 + attn / 2,
  }
  assert acc["convention"] == "6N_nohead+attn_causal"
  assert accounting.training_flops(cfg, 1000) == pytest.approx(154_560 * 1000)


def test_tied_multi_head_config_by_hand():
  # Sentencepiece vocabulary V = 100, head tied to the embedding, D = 16, L = 1, 2 heads of E = 8, F = 48, T = 8.
  cfg = small_config(
    **{
      "tokenizer.kind": "sentencepiece",
      "tokenizer.vocab_size": 100,
      "model.d_model": 16,
      "model.n_layers": 1,
      "model.n_heads": 2,
      "model.n_kv_heads": 2,
      "model.d_ff": 48,
      "model.tie_embeddings": True,
      "data.seq_len": 8,
    }
  )
  block = 4 * 16 * 16 + 3 * 16 * 48 + 2 * 16  # wq, wk, wv, wo (1_024) + MLP (2_304) + two norms (32)
  acc = accounting.accounting(cfg)
  assert accounting.vocab_size(cfg) == 100
  assert acc["params"] == {
    "total": 4_976,  # 3_376 + the one embedding table, 1_600
    "active": 4_976,
    "embedding": 1_600,
    "head": 0,
    "non_embedding": block + 16,
    "non_embedding_active": block + 16,
    "flop_params": 4_976,  # the tied table is the head's matmul
    "flop_params_total": 4_976,
  }
  assert block + 16 == 3_376
  assert acc["flops_per_token"] == {
    "6N": 29_856,
    "6N+attn": 29_856 + 1_536,  # 12 * L * T * D = 12 * 1 * 8 * 16
    "6N+attn_causal": 29_856 + 768,
    "6N_nohead": 20_256,
    "6N_nohead+attn": 20_256 + 1_536,
    "6N_nohead+attn_causal": 20_256 + 768,
  }
  assert acc["convention"] == "6N+attn"  # the default, the one tested against XLA
  assert accounting.training_flops(cfg, 2e6) == pytest.approx(31_392 * 2e6)
  assert accounting.accounting(cfg, vocab=200)["params"]["embedding"] == 200 * 16  # an explicit vocab wins


def test_mixture_of_experts_config_by_hand():
  # The first config's shapes with the second of its 2 layers an MoE layer: 4 experts of F = 48, top-2, 1 shared.
  cfg = small_config(
    **{
      "tokenizer.kind": "byte",
      "model.d_model": 32,
      "model.n_layers": 2,
      "model.n_heads": 4,
      "model.n_kv_heads": 2,
      "model.d_ff": 96,
      "model.moe.experts": 4,
      "model.moe.top_k": 2,
      "model.moe.every": 2,
      "model.moe.d_ff": 48,
      "model.moe.shared_experts": 1,
      "data.seq_len": 16,
    }
  )
  attention, norms = 3_072, 2 * 32
  dense_block = attention + 3 * 32 * 96 + norms  # 12_352, as above
  expert = 3 * 32 * 48  # 4_608
  moe_block = attention + 32 * 4 + 4 * expert + expert + norms  # router + 4 routed experts + 1 shared = 26_304
  moe_block_active = attention + 32 * 4 + 2 * expert + expert + norms  # router + top-2 + shared = 17_088
  acc = accounting.accounting(cfg)
  p = acc["params"]
  assert p["non_embedding"] == dense_block + moe_block + 32 == 38_688
  assert p["non_embedding_active"] == dense_block + moe_block_active + 32 == 29_472
  assert p["total"] - p["active"] == 2 * expert  # the two experts a token skips
  assert p["flop_params"] == 29_472 + 264 * 32 and p["flop_params_total"] == 38_688 + 264 * 32
  # FLOPs per token follow the active parameters
  assert acc["flops_per_token"]["6N"] == 6 * p["flop_params"]
  assert acc["flops_per_token"]["6N_nohead"] == 6 * 29_472
