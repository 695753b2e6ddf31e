"""`lm bench train` and `lm bench sample`: throughput of training and of sampling, as one JSON line.

`train` times the step `lm train` runs (same model, sharding, AdamW with clipping), fed a fixed
random batch so that the data pipeline is not timed. MFU is against a matmul peak measured in
the same process: `mfu` counts the run's FLOP convention (`flops_per_token`), `mfu_computed` the
matmuls the step really computes (`lm.flops.flops_per_token_computed`: attention over causal query
blocks). Beside it runs `lm.bare`, the same model and step written in bare jax.numpy:
what the library's layers (Flax, sharding, optax, its custom backward passes) cost or save.
With `--peer PYTHON`, PyTorch's version of the same model (`--peer-script`) runs in eager and
compiled mode in the same invocation, and the JSON gains the ratios.

`sample` times `lm.sampling` on the preset's model with random weights: prefill, greedy cached
decoding at batch 1 and 8, and the naive loop that reruns the whole forward pass for every new
token. With `--peer PYTHON`, Hugging Face `generate()` on a Llama of the `ref` shape
(../shared/peers/hf_generate.py) runs in the same invocation, and the JSON gains the ratios.

`moe` times the train step of a config's dense model and of its mixture-of-experts twin of the same active
parameters (`--experts` experts of width d_ff / top_k, top-k routing; the config's other `model.moe.*` keys),
alternating between the two so that both see the same machine, and prints both and their ratio.

`score` times `lm eval`'s scorer on a run's checkpoint: random short requests (a bos and 8 to 48 tokens of
context, a continuation of 1 to 8), packed several to a row as evaluations score them and one to a row, in the
same invocation, and the largest difference between the two's log-likelihoods.

`matmul` times the single matmuls those steps are made of, under XLA and, with `--peer PYTHON`,
under PyTorch in the same invocation: how much of a gap to PyTorch is the kernels' own.
"""

import dataclasses
import json
import pathlib
import resource
import subprocess
import sys
import time
from collections.abc import Callable

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


def fixed_tokens(vocab: int, batch: int, length: int) -> np.ndarray:
  """The benchmarks' batch: [batch, length + 1] random token ids, the same in every step and run."""
  return np.random.default_rng(0).integers(0, vocab, (batch, length + 1)).astype(np.int32)


def train_step_throughput(cfg, steps: int = 10, warmup: int = 3, profile: bool = False) -> dict:
  """Times `steps` train steps after `warmup`; returns the benchmark record.

  With `profile`, the record gains `profile`: where a step's time goes, by kind of op and by op.
  """
  import jax  # noqa: PLC0415

  from lm import config as config_lib  # noqa: PLC0415
  from lm import flops as flops_lib  # noqa: PLC0415
  from lm import partitioning  # noqa: PLC0415
  from lm import state as state_lib  # noqa: PLC0415
  from lm import step as step_lib  # noqa: PLC0415
  from lm.scaling import accounting  # noqa: PLC0415

  config_lib.validate(cfg, jax.device_count())
  vocab = accounting.vocab_size(cfg)  # a byte tokenizer's 264, not the unused tokenizer.vocab_size
  mesh = partitioning.make_mesh(cfg)
  setup = state_lib.build(cfg, vocab, mesh)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  tokens_BxT1 = fixed_tokens(vocab, b, t)
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
    lowered = step_lib.make_train_step(setup).lower(state, batch)
    step_fn = lowered.compile()
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
    ops = None
    if profile:
      carry, profiled_steps = [state], 3

      def run(compiled):
        for _ in range(profiled_steps):
          carry[0], out = compiled(carry[0], batch)
        return out

      ops = profile_ops(lowered, run, steps=profiled_steps)
  step_s = float(np.median(times))
  fpt = flops_lib.flops_per_token(setup.model_cfg, t, cfg.train.flops_convention)
  fpt_computed = flops_lib.flops_per_token_computed(setup.model_cfg, t)  # causal query blocks: below 6N+attn
  peak, peak_from = _peak(cfg.model.dtype)
  tokens_per_s = b * t / step_s
  record = {
    "impl": f"lm-jax-{cfg.model.dtype}",
    "tokens_per_s": tokens_per_s,
    "step_s": step_s,
    "compile_s": compile_s,
    "flops_per_token": fpt,
    "flops_convention": cfg.train.flops_convention,
    "mfu": tokens_per_s * fpt / peak,
    "flops_per_token_computed": fpt_computed,
    "mfu_computed": tokens_per_s * fpt_computed / peak,
    "matmul_peak_flops": peak,
    "peak_from": peak_from,
    "device_kind": jax.devices()[0].device_kind,
    "attention": setup.model_cfg.attention,
    "params": flops_lib.param_counts(setup.model_cfg)["total"],
    "loss": float(metrics["train/loss"]),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "devices": jax.device_count(),
  }
  if ops is not None:
    record["profile"] = ops
  return record


def bare_compatible(cfg) -> bool:
  """Whether `lm.bare` implements this config's model: f32, unscanned, untied, no z-loss, one process."""
  import jax  # noqa: PLC0415

  m = cfg.model
  plain = m.dtype == m.param_dtype == "float32" and not m.scan_layers and not m.tie_embeddings and not m.z_loss
  return plain and jax.process_count() == 1


def bare_step_throughput(cfg, steps: int = 10, warmup: int = 3) -> dict:
  """Times `lm.bare`'s train step (the same model and batch in bare jax.numpy, one device) like
  `train_step_throughput` times the real one: the median of `steps` steps after `warmup`."""
  import flax.linen as nn  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from lm import bare  # noqa: PLC0415
  from lm.model import ModelConfig, Transformer  # noqa: PLC0415

  vocab, m, o = cfg.tokenizer.vocab_size, cfg.model, cfg.optim
  model = Transformer(ModelConfig.from_config(cfg, vocab))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(cfg.train.seed), jnp.zeros((1, 8), jnp.int32))["params"])
  b, t = cfg.train.batch_size, cfg.data.seq_len
  tokens_BxT1 = fixed_tokens(vocab, b, t)
  inputs, targets = jnp.asarray(tokens_BxT1[:, :-1]), jnp.asarray(tokens_BxT1[:, 1:])
  step = bare.make_step(
    m.n_layers, o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm or float("inf"), m.norm_eps, m.rope_base
  )
  opt = bare.init_opt(params)
  times = []
  for _ in range(warmup + 1 + steps):  # the first call compiles
    t0 = time.perf_counter()
    params, opt, loss = step(params, opt, inputs, targets)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times[warmup + 1 :]))
  return {"tokens_per_s": b * t / step_s, "step_s": step_s, "loss": float(loss)}


# A fused op is named after its root: a matmul, a copy, or (anything else) elementwise work and reductions.
_KIND_OF_ROOT = {"dot_general": "matmul", "transpose": "copy/transpose", "copy": "copy/transpose"}


def _peak(dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of all local devices, where the figure comes from): the TPU or GPU data sheet, or on a
  CPU a matmul measured in this process."""
  import jax  # noqa: PLC0415

  from lm import flops as flops_lib  # noqa: PLC0415

  per_device = flops_lib.accelerator_peak_flops()
  if per_device is not None:
    return per_device * jax.local_device_count(), f"data sheet: {jax.devices()[0].device_kind}"
  return flops_lib.measure_matmul_flops(dtype), "measured matmul"


def profile_ops(lowered, run: Callable, steps: int, top: int = 12) -> dict:
  """Times the ops of `lowered` under the JAX profiler with XLA:CPU's per-op trace events.

  `run(compiled)` makes calls of the compiled program (once to warm up, then once traced) and
  returns an output to wait for; its calls make `steps` steps (train steps, decode steps).
  Returns op time per step in ms, summed over the runtime's threads (ops run concurrently, so it
  can exceed the step's wall time): by kind (matmul, copy/transpose, other fused elementwise and
  reductions) and the `top` costliest groups of ops, named by the JAX operation they come from
  with layer numbers folded (`layer_*`), and `fwd` / `bwd` for the forward and backward passes.
  """
  import re  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  import jax  # noqa: PLC0415

  compiled = lowered.compile(compiler_options={"xla_cpu_enable_xprof_traceme": True})
  origin = {}
  for line in compiled.as_text().splitlines():
    found = re.match(r'\s*(?:ROOT )?%(\S+) = .*?op_name="([^"]+)"', line)
    if found and not re.search(r" (while|conditional|call)\(", line):  # their events span the ops they run
      origin[found.group(1)] = re.sub(r"^jit\([^)]*\)/(while/body/)?", "", found.group(2))
  jax.block_until_ready(run(compiled))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(run(compiled))
    jax.profiler.stop_trace()
    (trace,) = list(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
  by_kind, by_op = {"matmul": 0.0, "copy/transpose": 0.0, "elementwise/reduce": 0.0}, {}
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        name = event.name.removeprefix("end: ")
        if name not in origin:
          continue  # runtime bookkeeping, not an op of the step
        op = re.sub(r"transpose\(jvp\(([^()]*)\)\)", r"bwd \1", origin[name])
        op = re.sub(r"layer_\d+", "layer_*", re.sub(r"jvp\(([^()]*)\)", r"fwd \1", op))
        kind = _KIND_OF_ROOT.get(op.rsplit("/", 1)[-1], "elementwise/reduce")
        ms = event.duration_ns / 1e6 / steps
        by_kind[kind] += ms
        key = f"{kind}: {op}"
        by_op[key] = by_op.get(key, 0.0) + ms
  ranked = sorted(by_op.items(), key=lambda item: -item[1])[:top]
  return {
    "op_ms_per_step": {k: round(v, 2) for k, v in by_kind.items()},
    "top_ops_ms_per_step": {k: round(v, 2) for k, v in ranked},
  }


def _failure(out: subprocess.CompletedProcess) -> str:
  """A failed peer's last line of stderr, or its exit status."""
  return out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"


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
    return {"error": _failure(out)}
  return json.loads(out.stdout.strip().splitlines()[-1])


def rl_throughput(cfg, rollouts: int) -> dict:
  """Rollout and update speed of RL through the real loop: the config's model (byte-level, 128-token rows) is
  trained one step on a generated instruction world (`lm.worlds.instructions`), then GRPO from it (groups of 8,
  rollouts of train.batch_size x 2 rows, 2 epochs, 64 new tokens, reward: a correct answer) for `rollouts` + 2
  rollouts. Reports the mean over the last `rollouts` (the first compiles) of what the run logs: generated
  tokens per second of sampling, update tokens per second, the share of wall time in rollouts, and how many
  programs the sampler compiled."""
  import tempfile  # noqa: PLC0415

  from lm import config as config_lib  # noqa: PLC0415
  from lm import metrics as metrics_lib  # noqa: PLC0415
  from lm import train  # noqa: PLC0415
  from lm.worlds import instructions  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as tmp:
    paths = instructions.write_world(f"{tmp}/world", n_train=10, n_eval=64, n_pairs=10, n_pretrain=200, n_prompts=2000)
    settings = {
      "tokenizer.kind": "byte",
      "data.seq_len": 128,
      "data.source": f"jsonl:{paths['pretrain']}",
      "data.cache_dir": f"{tmp}/cache",
      "train.steps": 1,
      "train.eval_every": 1,
      "train.eval_batches": 1,
      "mesh.data": -1,
    }
    for key, value in settings.items():
      config_lib.set_key(cfg, key, value)
    train.train(cfg, f"{tmp}/base", progress=False)
    per_rollout = 4
    rl = {
      "train.objective": "grpo",
      "train.init_from": f"{tmp}/base",
      "data.post_source": f"jsonl:{paths['prompts_train']}",
      "data.post_eval_source": f"jsonl:{paths['eval']}",
      "rl.reward_fn": "lm.worlds.instructions:correct",
      "rl.group_size": 8,
      "rl.num_minibatches": 2,
      "rl.ppo_epochs": 2,
      "rl.max_new_tokens": 64,
      "rl.eval_prompts": 8,
      "train.steps": (rollouts + 2) * per_rollout,  # the first cycle compiles; its rates are logged one later
      "train.eval_every": 10**6,
      "train.log_every": per_rollout,
      "train.checkpoint_every": 10**6,
    }
    for key, value in rl.items():
      config_lib.set_key(cfg, key, value)
    config_lib.validate(cfg)
    train.train(cfg, f"{tmp}/rl", progress=False)
    rows = [r for r in metrics_lib.read_metrics(f"{tmp}/rl") if "rl/rollout_share" in r][-rollouts:]
  keys = ("rl/rollout_tokens_per_s", "rl/update_tokens_per_s", "rl/rollout_share", "rl/rollout_s", "step_s")
  out = {key.removeprefix("rl/"): float(np.mean([r[key] for r in rows])) for key in keys}
  return {
    **out,
    "rollout_rows": cfg.train.batch_size * 2,
    "rollouts_timed": len(rows),
    "sampler_compiles": int(rows[-1]["rl/sampler_compiles"]),
  }


def moe_twin(cfg, experts: int):
  """`cfg`'s mixture-of-experts twin: `experts` experts of width d_ff / top_k in every layer, so that a token's
  experts hold as many parameters as the dense MLP (the router aside)."""
  from lm.errors import UserError  # noqa: PLC0415

  twin = cfg.copy_and_resolve_references()
  moe = twin.model.moe
  moe.experts, moe.every = experts, 1
  if moe.top_k > experts or cfg.model.d_ff % moe.top_k:
    raise UserError(f"model.moe.top_k ({moe.top_k}) must divide model.d_ff and be at most --experts ({experts})")
  moe.d_ff = cfg.model.d_ff // moe.top_k
  return twin


def moe_comparison(cfg, experts: int, steps: int, rounds: int = 2) -> dict:
  """Train-step throughput of `cfg` as a dense model and of its `moe_twin`, `rounds` times each in turn (the best
  of each counts)."""
  dense_cfg = cfg.copy_and_resolve_references()
  dense_cfg.model.moe.experts = 0
  configs = {"dense": dense_cfg, "moe": moe_twin(cfg, experts)}
  runs = {name: [] for name in configs}
  for _ in range(rounds):
    for name, c in configs.items():
      runs[name].append(train_step_throughput(c, steps))
  record = {"experts": experts, "top_k": cfg.model.moe.top_k, "capacity_factor": cfg.model.moe.capacity_factor}
  from lm.scaling import accounting  # noqa: PLC0415

  for name, c in configs.items():
    best = max(runs[name], key=lambda r: r["tokens_per_s"])
    counts = accounting.accounting(c)["params"]
    record[name] = {
      **{k: best[k] for k in ("tokens_per_s", "step_s", "flops_per_token", "mfu", "flops_per_token_computed")},
      "params_total": counts["total"],
      "params_active": counts["active"],
    }
  record["moe_vs_dense_tokens_per_s"] = record["moe"]["tokens_per_s"] / record["dense"]["tokens_per_s"]
  return record


def main(args, overrides: list[str]) -> None:
  if args.what == "moe":
    cfg = bench_config(args.preset, overrides, args.config)
    print(json.dumps({"preset": args.config or args.preset, **moe_comparison(cfg, args.experts, args.steps)}))
    sys.stdout.flush()
    return
  if args.what == "rl":
    cfg = bench_config(args.preset, overrides, args.config)
    print(json.dumps({"preset": args.config or args.preset, **rl_throughput(cfg, args.steps)}))
    sys.stdout.flush()
    return
  if args.what == "score":
    print(json.dumps(score_throughput(args.workdir, args.requests)))
    sys.stdout.flush()
    return
  if args.what == "data":
    print(json.dumps(data_bench(args, overrides)))
    sys.stdout.flush()
    return
  cfg = bench_config(args.preset, overrides, args.config)
  if args.what == "matmul":
    print(json.dumps(matmul_speeds(args.peer)))
    sys.stdout.flush()
    return
  if args.what == "sample":
    record = {"preset": args.config or args.preset, **sample_throughput(cfg, args.new_tokens, profile=args.profile)}
    if args.peer:
      record.update(hf_peer(args.peer, args.peer_script or "../shared/peers/hf_generate.py", record))
    print(json.dumps(record))
    sys.stdout.flush()
    return
  record = {"preset": args.config or args.preset, **train_step_throughput(cfg, args.steps, profile=args.profile)}
  if not args.no_bare and bare_compatible(cfg):
    base = bare_step_throughput(cfg, args.steps)
    record["bare_jax_tokens_per_s"] = base["tokens_per_s"]
    record["ratio_vs_bare_jax"] = record["tokens_per_s"] / base["tokens_per_s"]
  if cfg.model.dtype == "float32" and not args.no_bf16:
    # bf16 compute beside f32: f32 params, bf16 matmul inputs, f32 accumulation.
    low = bench_config(args.preset, [*overrides, "model.dtype=bfloat16"], args.config)
    bf16 = train_step_throughput(low, args.steps)
    record.update({f"bf16_{k}": bf16[k] for k in ("tokens_per_s", "step_s", "mfu", "loss")})
    record["bf16_vs_f32"] = bf16["tokens_per_s"] / record["tokens_per_s"]
  if args.peer:
    for name, compiled in (("torch_eager", False), ("torch_compile", True)):
      peer = run_peer(args.peer, args.peer_script or "../shared/peers/torch_llama.py", compiled, cfg, args.steps)
      record[f"{name}_tokens_per_s"] = peer.get("tokens_per_s")
      if "tokens_per_s" in peer:
        record[f"ratio_vs_{name}"] = record["tokens_per_s"] / peer["tokens_per_s"]
      else:
        record[f"{name}_error"] = peer["error"]
  print(json.dumps(record))
  sys.stdout.flush()


def score_throughput(workdir: str | None, requests: int, seed: int = 0) -> dict:
  """`lm bench score`: log-likelihood requests a second, packed into shared rows and one to a row."""
  from lm import tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm.errors import UserError  # noqa: PLC0415
  from lm.evals import scoring  # noqa: PLC0415

  if not workdir:
    raise UserError("lm bench score needs --workdir RUN (a trained run whose checkpoint to score with)")
  if requests < 1:
    raise UserError(f"lm bench score needs --requests of at least 1, got {requests}")
  scorer = scoring.Scorer.from_run(workdir)
  rng = np.random.default_rng(seed)
  ids = lambda n: rng.integers(len(tokenizer_lib.SPECIAL_TOKENS), scorer.tok.vocab_size, n).tolist()  # noqa: E731
  pairs = [([scorer.tok.bos_id, *ids(rng.integers(8, 49))], ids(rng.integers(1, 9))) for _ in range(requests)]
  record, scores = {"workdir": workdir, "requests": requests, "context": scorer.context}, {}
  for name, packed in (("packed", True), ("one_a_row", False)):
    timed = dataclasses.replace(scorer, packed=packed)
    timed.loglikelihood(pairs[: timed.batch_size])  # compiles
    start = time.perf_counter()
    scores[name] = np.array([lp for lp, _ in timed.loglikelihood(pairs)])
    record[f"{name}_requests_per_s"] = requests / (time.perf_counter() - start)
  record["speedup"] = record["packed_requests_per_s"] / record["one_a_row_requests_per_s"]
  record["max_abs_logp_diff"] = float(np.abs(scores["packed"] - scores["one_a_row"]).max())
  return record


def data_bench(args, overrides: list[str]) -> dict:
  """`lm bench data`: the config's data pipelines (see `lm.data.bench`), with a run's tokenizer or a new one."""
  from lm import config as config_lib  # noqa: PLC0415
  from lm import tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm.data import bench as data_bench_lib  # noqa: PLC0415
  from lm.data import corpus_builder  # noqa: PLC0415
  from lm.errors import UserError  # noqa: PLC0415

  if not args.config:
    raise UserError("lm bench data needs --config FILE (the experiment whose data to time)")
  cfg = config_lib.load_config(args.config, overrides)
  config_lib.validate(cfg)
  start = time.perf_counter()
  if args.workdir:
    tok = tokenizer_lib.load_tokenizer(args.workdir)
  else:
    tok = tokenizer_lib.train_tokenizer(cfg, corpus_builder.training_text(cfg, cfg.tokenizer.train_bytes))
  record = {"config": args.config, "tokenizer_s": time.perf_counter() - start}
  return {**record, **data_bench_lib.data_throughput(cfg, tok, args.batches)}


def sample_throughput(
  cfg, new_tokens: int = 512, prompt_len: int = 16, bucket: int = 64, repeats: int = 3, profile: bool = False
) -> dict:
  """Tokens/s of prefill, of greedy cached decoding at batch 1 and 8, and of the recompute loop.

  Decoding rates time whole `generate` calls (prefill of a `prompt_len`-token prompt included,
  compilation not) making `new_tokens` per row, the fastest of `repeats`. Prefill is timed on a
  `new_tokens`-token prompt.
  The recompute loop makes the same number of tokens, each from a full forward pass over the
  sequence so far, padded to a multiple of `bucket` so that only a few shapes are compiled.
  With `profile`, the record gains `profile_batch8`: where a batch-8 decode step's time goes, by op.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from lm import config as config_lib  # noqa: PLC0415
  from lm import flops as flops_lib  # noqa: PLC0415
  from lm import sampling  # noqa: PLC0415
  from lm.model import ModelConfig, Transformer  # noqa: PLC0415

  config_lib.validate(cfg)
  vocab = cfg.tokenizer.vocab_size
  model_cfg = ModelConfig.from_config(cfg, vocab)
  model = Transformer(model_cfg)
  context = prompt_len + new_tokens
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  sampler = sampling.Sampler.for_model(model, context)
  greedy = sampling.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
  rng = np.random.default_rng(0)

  def timed(fn) -> float:
    """The fastest of `repeats` calls after a first one that compiles: these cores are shared."""
    fn()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return min(times)

  def decode_rate(batch: int) -> float:
    prompts = [rng.integers(7, vocab, prompt_len).tolist() for _ in range(batch)]
    out = []
    elapsed = timed(lambda: out.append(sampler.generate(params, prompts, [greedy] * batch)))
    assert all(len(g.tokens) == new_tokens for g in out[-1])
    return batch * new_tokens / elapsed

  long_prompt = [rng.integers(7, vocab, new_tokens).tolist()]
  prefill_s = timed(lambda: sampler.generate(params, long_prompt, [dataclasses.replace(greedy, max_new_tokens=1)]))

  forward = jax.jit(lambda p, x, n: jnp.argmax(model.apply({"params": p}, x)[0, n - 1]).astype(jnp.int32))

  def recompute() -> None:
    seq = rng.integers(7, vocab, prompt_len).tolist()
    for _ in range(new_tokens):
      padded = np.zeros((1, -(-len(seq) // bucket) * bucket), np.int32)  # causal: the padding is never seen
      padded[0, : len(seq)] = seq
      seq.append(int(forward(params, padded, len(seq))))

  for length in range(bucket, -(-context // bucket) * bucket + 1, bucket):  # compile every bucket first
    forward(params, np.zeros((1, length), np.int32), 1).block_until_ready()
  t0 = time.perf_counter()
  recompute()
  recompute_rate = new_tokens / (time.perf_counter() - t0)

  peak, peak_from = _peak(cfg.model.dtype)
  forward_flops = flops_lib.flops_per_token(model_cfg, context) / 3  # one forward pass per token
  record = {
    "impl": f"lm-jax-{cfg.model.dtype}",
    "device_kind": jax.devices()[0].device_kind,
    "peak_flops": peak,
    "peak_from": peak_from,
    "new_tokens": new_tokens,
    "prompt_tokens": prompt_len,
    "prefill_tokens_per_s": new_tokens / prefill_s,
    "decode_tokens_per_s": decode_rate(1),
    "recompute_tokens_per_s": recompute_rate,
    "batch8_decode_tokens_per_s": decode_rate(8),
    "params": flops_lib.param_counts(model_cfg)["total"],
    "devices": jax.device_count(),
  }
  if profile:
    prompts = [rng.integers(7, vocab, prompt_len).tolist() for _ in range(8)]
    starts = [sampler._start(params, prompts, [greedy] * 8) for _ in range(2)]  # the loop donates its state
    controls, steps = starts[0][1], np.int32(new_tokens)
    lowered = sampler._decode.lower(params, starts[0][0], controls, steps)
    record["profile_batch8"] = profile_ops(lowered, lambda c: c(params, starts.pop()[0], controls, steps), new_tokens)
    record["step_ms_by_cache_slots"] = step_ms_by_cache_slots(sampler, params, vocab, prompt_len, new_tokens, rng)
  record["cached_vs_recompute"] = record["decode_tokens_per_s"] / record["recompute_tokens_per_s"]
  for key in ("prefill", "decode", "batch8_decode"):
    record[f"{key}_mfu"] = record[f"{key}_tokens_per_s"] * forward_flops / peak
  record["batch8_vs_batch1"] = record["batch8_decode_tokens_per_s"] / record["decode_tokens_per_s"]
  return record


# The matmuls the ref model's steps are made of: name -> (batch, rows, inner, columns).
MATMUL_SHAPES = {
  "decode_b1_mlp": (1, 1, 256, 768),
  "decode_b8_mlp": (1, 8, 256, 768),
  "decode_b1_head": (1, 1, 256, 8192),
  "decode_b8_head": (1, 8, 256, 8192),
  "train_mlp_in": (1, 4096, 256, 768),
  "train_mlp_out": (1, 4096, 768, 256),
  "train_head": (1, 4096, 256, 8192),
  "train_attention": (64, 256, 64, 256),
}

# Times the same matmuls in PyTorch: run by the peer's interpreter with the shapes as JSON.
_TORCH_MATMULS = """
import json, sys, time
import torch
out = {}
for name, (b, m, k, n, r) in json.loads(sys.argv[1]).items():
  xs = torch.randn(b, m, k).squeeze(0)
  ws = [torch.randn(b, k, n).squeeze(0) for _ in range(r)]
  best = float("inf")
  for _ in range(20):
    t0 = time.perf_counter()
    for w in ws:
      xs @ w
    best = min(best, (time.perf_counter() - t0) / r)
  out[name] = best
print(json.dumps(out))
"""


def matmul_speeds(peer: str | None = None, repeats: int = 20, names: tuple[str, ...] = tuple(MATMUL_SHAPES)) -> dict:
  """Seconds per matmul for `MATMUL_SHAPES` under XLA (and PyTorch with `peer`), with GFLOP/s.

  Small matmuls run as a chain of r independent products with different weights (about 32 MB of
  them, as a model's do not stay in cache), timed as one call and divided by r; the fastest of
  `repeats` calls counts.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  rng = np.random.default_rng(0)
  shapes = {}
  for name in names:
    b, m, k, n = MATMUL_SHAPES[name]
    r = max(1, min(32, 8_000_000 // (b * k * n))) if m <= 64 else 1
    shapes[name] = (b, m, k, n, r)
  record = {}
  for name, (b, m, k, n, r) in shapes.items():
    x = jnp.asarray(rng.standard_normal((b, m, k), np.float32)[0 if b == 1 else slice(None)])
    ws = [jnp.asarray(rng.standard_normal((b, k, n), np.float32)[0 if b == 1 else slice(None)]) for _ in range(r)]
    products = jax.jit(lambda x, ws: [x @ w for w in ws])
    jax.block_until_ready(products(x, ws))
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(products(x, ws))
      best = min(best, (time.perf_counter() - t0) / r)
    flops = 2 * b * m * k * n
    record[name] = {"shape": [b, m, k, n], "xla_ms": best * 1e3, "xla_gflops": flops / best / 1e9}
  if peer:
    out = subprocess.run([peer, "-c", _TORCH_MATMULS, json.dumps(shapes)], capture_output=True, text=True, check=False)
    if out.returncode:
      record["torch_error"] = _failure(out)
      return record
    for name, seconds in json.loads(out.stdout.strip().splitlines()[-1]).items():
      b, m, k, n = MATMUL_SHAPES[name]
      record[name].update(
        torch_ms=seconds * 1e3,
        torch_gflops=2 * b * m * k * n / seconds / 1e9,
        xla_vs_torch=seconds / (record[name]["xla_ms"] / 1e3),
      )
  return record


def step_ms_by_cache_slots(sampler, params, vocab: int, prompt_len: int, new_tokens: int, rng, steps: int = 64) -> dict:
  """ms per greedy decode step at batch 1 and 8 with KV caches of a few sizes, up to the size that
  `new_tokens` needs: how the cost of attending over the cache grows with it. Each is the fastest
  of 3 runs of `steps` steps (fewer if the cache is smaller) from a fresh prefill, the sizes taking
  turns so that a change in the machine's speed does not favour one."""
  import jax  # noqa: PLC0415

  from lm import sampling  # noqa: PLC0415

  record = {}
  for batch in (1, 8):
    prompts = [rng.integers(7, vocab, prompt_len).tolist() for _ in range(batch)]
    sizes = sorted({max(1, new_tokens // 8), max(1, new_tokens // 2), new_tokens})
    requests = {
      new: [sampling.SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)] * batch for new in sizes
    }
    best, slots = dict.fromkeys(sizes, float("inf")), {}
    for _ in range(4):  # the first round compiles and is never the fastest
      for new in sizes:
        state, controls = sampler._start(params, prompts, requests[new])
        slots[new], n = jax.tree.leaves(state["cache"]["v"])[0].shape[-2], min(steps, new)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        sampler._decode(params, state, controls, np.int32(n))["tokens"].block_until_ready()
        best[new] = min(best[new], (time.perf_counter() - t0) / n)
    record[f"batch{batch}"] = {str(slots[new]): best[new] * 1e3 for new in sizes}
  return record


def hf_peer(python: str, script: str, record: dict) -> dict:
  """Runs the Hugging Face `generate()` peer (always the `ref` shape, 512 new tokens after a
  16-token prompt) and returns its numbers, prefixed `hf_`, with our ratios to them."""
  out = subprocess.run([python, script], capture_output=True, text=True, check=False)
  if out.returncode:
    return {"hf_error": _failure(out)}
  peer = json.loads(out.stdout.strip().splitlines()[-1])
  keys = ("decode_tokens_per_s", "batch8_decode_tokens_per_s", "recompute_tokens_per_s")
  result = {f"hf_{k}": peer[k] for k in keys}
  result["vs_hf_batch1"] = record["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
  result["vs_hf_batch8"] = record["batch8_decode_tokens_per_s"] / peer["batch8_decode_tokens_per_s"]
  return result
