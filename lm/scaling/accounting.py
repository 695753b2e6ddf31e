"""Parameter counts and FLOPs per token of a config under every named convention (see `lm.flops`)."""

import ml_collections

from lm import flops as flops_lib
from lm.model import ModelConfig


def vocab_size(cfg: ml_collections.ConfigDict) -> int:
  """The vocabulary of a config's tokenizer: 256 bytes + the specials of `lm.tokenizer`, or the sentencepiece size."""
  from lm import tokenizer as tokenizer_lib  # noqa: PLC0415

  if cfg.tokenizer.kind == "byte":
    return tokenizer_lib.ByteTokenizer.vocab_size
  return cfg.tokenizer.vocab_size


def accounting(cfg: ml_collections.ConfigDict, vocab: int | None = None) -> dict:
  """{params: counts, flops_per_token: {convention: FLOPs}, convention: the run's} of a config."""
  model_cfg = ModelConfig.from_config(cfg, vocab or vocab_size(cfg))
  return {
    "params": flops_lib.param_counts(model_cfg),
    "flops_per_token": {c: flops_lib.flops_per_token(model_cfg, cfg.data.seq_len, c) for c in flops_lib.CONVENTIONS},
    "convention": cfg.train.flops_convention,
  }


def training_flops(cfg: ml_collections.ConfigDict, tokens: float, vocab: int | None = None) -> float:
  """Training FLOPs of `tokens` tokens under the config's own convention (`train.flops_convention`)."""
  return accounting(cfg, vocab)["flops_per_token"][cfg.train.flops_convention] * tokens
