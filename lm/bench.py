"""`lm bench train`: steady-state throughput of the real train step, as one JSON line.

The step is the one `lm train` runs (same model, sharding, AdamW with clipping), fed a fixed
random batch so that the data pipeline is not timed. MFU is against a matmul peak measured in
the same process. With `--peer PYTHON`, PyTorch's version of the same model (`--peer-script`)
runs in eager and compiled mode in the same invocation, and the JSON gains the ratios.
"""

import dataclasses
import json
import resource
import subprocess
import sys
import time

import numpy as np

PRESETS = {
  # The reference configuration shared with the PyTorch peer.
  "ref": {
    "tokenizer.vocab_size": 8192,
    "model.d_model": 256,
    "model.n_layers": 4,
    "model.n_heads": 4,
    "model.n_kv_heads": 4,
    "model.d_ff": 768,
    "model.tie_embeddings": False,
    "data.seq_len": 256,
    "train.batch_size": 16,
    "optim.clip_norm": 1.0,
    "optim.weight_decay": 0.1,
  },
  # A few-million-parameter model, like the quickstart.
  "small": {
    "tokenizer.vocab_size": 4096,
    "model.d_model": 192,
    "model.n_layers": 4,
    "model.n_heads": 6,
    "model.n_kv_heads": 2,
    "model.d_ff": 512,
    "data.seq_len": 256,
    "train.batch_size": 16,
  },
}


def bench_config(preset: str, overrides: list[str], config_file: str | None = None):
  from lm import config as config_lib  # noqa: PLC0415
  from lm.errors import UserError  # noqa: PLC0415

  if config_file:
    cfg = config_lib.load_config(config_file)
  else:
    if preset not in PRESETS:
      raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = config_lib.default_config()
    for key, value in PRESETS[preset].items():
      config_lib.set_key(cfg, key, value)
  for item in overrides:
    config_lib.apply_override(cfg, item)
  return cfg


def train_step_throughput(cfg, steps: int = 10, warmup: int = 3) -> dict:
  """Times `steps` train steps after `warmup`; returns the benchmark record."""
  import jax  # noqa: PLC0415

  from lm import config as config_lib  # noqa: PLC0415
  from lm import flops as flops_lib  # noqa: PLC0415
  from lm import partitioning, train  # noqa: PLC0415

  config_lib.validate(cfg, jax.device_count())
  vocab = cfg.tokenizer.vocab_size
  mesh = partitioning.make_mesh(cfg)
  setup = train.build(cfg, vocab, mesh)
  step_fn = train.make_train_step(setup)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  tokens_BxT1 = np.random.default_rng(0).integers(0, vocab, (b, t + 1)).astype(np.int32)
  batch = {
    "inputs": tokens_BxT1[:, :-1],
    "targets": tokens_BxT1[:, 1:],
    "segment_ids": np.ones((b, t), np.int32),
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    "loss_mask": np.ones((b, t), np.float32),
  }
  batch = jax.device_put(batch, partitioning.batch_sharding(mesh))
  with setup.context():
    state = setup.init_state()
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  fpt = flops_lib.flops_per_token(setup.model_cfg, t, cfg.train.flops_convention)
  peak = flops_lib.measure_matmul_flops(cfg.model.dtype)
  tokens_per_s = b * t / step_s
  return {
    "impl": f"lm-jax-{cfg.model.dtype}",
    "tokens_per_s": tokens_per_s,
    "step_s": step_s,
    "compile_s": compile_s,
    "flops_per_token": fpt,
    "flops_convention": cfg.train.flops_convention,
    "mfu": tokens_per_s * fpt / peak,
    "matmul_peak_flops": peak,
    "params": flops_lib.param_counts(setup.model_cfg)["total"],
    "loss": float(metrics["train/loss"]),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "devices": jax.device_count(),
  }


def run_peer(python: str, script: str, compiled: bool, cfg, steps: int) -> dict:
  """Runs the PyTorch peer on the same shapes and returns its JSON record."""
  args = [
    python,
    script,
    f"--vocab={cfg.tokenizer.vocab_size}",
    f"--d-model={cfg.model.d_model}",
    f"--layers={cfg.model.n_layers}",
    f"--heads={cfg.model.n_heads}",
    f"--kv-heads={cfg.model.n_kv_heads}",
    f"--ffn={cfg.model.d_ff}",
    f"--seq={cfg.data.seq_len}",
    f"--batch={cfg.train.batch_size}",
    f"--steps={steps}",
  ] + (["--compile"] if compiled else [])
  out = subprocess.run(args, capture_output=True, text=True, check=False)
  if out.returncode:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(args, overrides: list[str]) -> None:
  cfg = bench_config(args.preset, overrides, args.config)
  record = {"preset": args.config or args.preset, **train_step_throughput(cfg, steps=args.steps)}
  if args.peer:
    for name, compiled in (("torch_eager", False), ("torch_compile", True)):
      peer = run_peer(args.peer, args.peer_script, compiled, cfg, args.steps)
      record[f"{name}_tokens_per_s"] = peer.get("tokens_per_s")
      if "tokens_per_s" in peer:
        record[f"ratio_vs_{name}"] = record["tokens_per_s"] / peer["tokens_per_s"]
      else:
        record[f"{name}_error"] = peer["error"]
  print(json.dumps(record))
  sys.stdout.flush()


def sample_throughput(cfg, new_tokens: int = 512, prompt_len: int = 16, recompute_tokens: int = 64) -> dict:
  """Tokens/s of prefill, cached decode at batch 1 and 8, and the no-cache recompute loop."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from lm import flops as flops_lib  # noqa: PLC0415
  from lm import sampling  # noqa: PLC0415
  from lm.model import ModelConfig, Transformer  # noqa: PLC0415
  from lm.tokenizer import EOS_ID, ByteTokenizer  # noqa: PLC0415

  vocab = cfg.tokenizer.vocab_size
  model_cfg = ModelConfig.from_config(cfg, vocab)
  model = Transformer(model_cfg)
  context = prompt_len + new_tokens
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  sampler = sampling.Sampler.for_model(model, context, ByteTokenizer(), EOS_ID)
  greedy = sampling.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
  rng = np.random.default_rng(0)

  def decode_rate(batch: int) -> float:
    prompts = [list(rng.integers(7, vocab, prompt_len)) for _ in range(batch)]
    requests = [dataclasses.replace(greedy, max_new_tokens=8)] * batch
    sampler.generate(params, prompts, requests)  # compile the short loop
    sampler.generate(params, prompts, [greedy] * batch)  # and the long one
    t0 = time.perf_counter()
    out = sampler.generate(params, prompts, [greedy] * batch)
    elapsed = time.perf_counter() - t0
    assert all(len(g.tokens) == new_tokens for g in out)
    return batch * new_tokens / elapsed

  prompt_1xP = jnp.asarray(rng.integers(7, vocab, (1, context)), jnp.int32)
  prefill = jax.jit(lambda p, x: model.apply({"params": p}, x))
  jax.block_until_ready(prefill(params, prompt_1xP))
  t0 = time.perf_counter()
  jax.block_until_ready(prefill(params, prompt_1xP))
  prefill_s = time.perf_counter() - t0

  # The naive loop: every new token reruns the full forward pass over a fixed-size buffer.
  def recompute_rate() -> float:
    buffer_1xS = np.zeros((1, context), np.int32)
    buffer_1xS[0, :prompt_len] = rng.integers(7, vocab, prompt_len)
    length = prompt_len
    step = jax.jit(lambda p, x, n: jnp.argmax(model.apply({"params": p}, x)[0, n - 1]))
    int(step(params, buffer_1xS, length))
    t0 = time.perf_counter()
    for _ in range(recompute_tokens):
      buffer_1xS[0, length] = int(step(params, buffer_1xS, length))
      length += 1
    return recompute_tokens / (time.perf_counter() - t0)

  return {
    "impl": f"lm-jax-{cfg.model.dtype}",
    "new_tokens": new_tokens,
    "prompt_tokens": prompt_len,
    "prefill_tokens_per_s": context / prefill_s,
    "decode_tokens_per_s": decode_rate(1),
    "recompute_tokens_per_s": recompute_rate(),
    "batch8_decode_tokens_per_s": decode_rate(8),
    "params": flops_lib.param_counts(model_cfg)["total"],
  }
