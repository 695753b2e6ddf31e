"""`lm bench data`: what the global row shuffle costs at start-up and per batch, beside the streamed pipeline.

Everything runs in one process against a fresh data directory, so the corpus is prepared and
tokenized from scratch: the times are what a run's first start pays (later starts reuse both).
"""

import tempfile
import time

from lm import config as config_lib
from lm.data import corpus_builder, pipeline, tokens
from lm.tokenizer import Tokenizer


def rss_mb() -> float:
  """This process's resident memory now, in MB (Linux /proc)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def data_throughput(cfg, tokenizer: Tokenizer, batches: int = 200) -> dict:
  """Start-up and batch rates of `data.shuffle=global` and `window` for `cfg`'s train split, as one JSON record."""
  record = {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size}
  with tempfile.TemporaryDirectory() as cache:
    cfg = config_lib.from_json(config_lib.to_json(cfg))
    cfg.data.cache_dir = cache
    start, rss = time.perf_counter(), rss_mb()
    corpus_builder.prepare(cfg)
    record["prepare_s"] = time.perf_counter() - start
    start = time.perf_counter()
    file = tokens.token_file(cfg, tokenizer, "train")
    record["tokenize_s"] = time.perf_counter() - start
    record["train_tokens"] = int(len(file.tokens))
    record["tokenize_tokens_per_s"] = record["train_tokens"] / record["tokenize_s"]
    record["token_file_mb"] = file.tokens.nbytes / 2**20
    record["rss_growth_tokenizing_mb"] = rss_mb() - rss
    for shuffle in ("global", "window"):
      run_cfg = config_lib.from_json(config_lib.to_json(cfg))
      run_cfg.data.shuffle = shuffle
      rss, start = rss_mb(), time.perf_counter()
      it = pipeline.make_train_iterator(run_cfg, tokenizer)
      next(it)
      record[f"{shuffle}_first_batch_s"] = time.perf_counter() - start
      start = time.perf_counter()
      for _ in range(batches):
        next(it)
      elapsed = time.perf_counter() - start
      record[f"{shuffle}_tokens_per_s"] = batches * cfg.train.batch_size * cfg.data.seq_len / elapsed
      record[f"{shuffle}_rss_growth_mb"] = rss_mb() - rss
  return record
