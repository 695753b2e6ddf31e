import json
import subprocess
import sys

import pytest

from lm import bench
from lm.errors import UserError

from conftest import REPO


def test_ref_preset_is_the_shared_reference_model():
  cfg = bench.bench_config("ref", [])
  assert (cfg.tokenizer.vocab_size, cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (8192, 256, 4, 4)
  assert (cfg.model.n_kv_heads, cfg.model.d_ff, cfg.data.seq_len, cfg.train.batch_size) == (4, 768, 256, 16)
  assert cfg.model.dtype == "float32" and cfg.optim.clip_norm > 0
  with pytest.raises(UserError, match="unknown preset"):
    bench.bench_config("huge", [])


def test_bench_prints_one_json_line_with_the_contract_keys():
  small = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.tokenizer.vocab_size=512"]
  out = subprocess.run(
    [sys.executable, "-m", "lm.cli", "bench", "train", "--preset", "ref", "--steps", "2", *small],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  for key in ("tokens_per_s", "step_s", "compile_s", "flops_per_token", "mfu", "peak_rss_mb"):
    assert record[key] > 0, key
  assert record["tokens_per_s"] == pytest.approx(16 * 256 / record["step_s"])
  assert record["mfu"] < 1.0
