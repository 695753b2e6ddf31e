"""Configs: defaults, experiment-file loading, `--config.a.b=v` overrides and validation.

Every key an experiment may set exists in `default_config()`; an experiment's `get_config()`
starts from it and changes what it needs. Validation runs before anything touches a workdir, and
every problem is a `UserError` naming the key.
"""

import importlib.util
import json
import math
import os
import re
import sys

import ml_collections

from lm.errors import UserError

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the projections LoRA may adapt


TOKENIZER_KINDS = ("sentencepiece", "byte", "huggingface")


def default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults: a ~1M-parameter model on the standard library, 200 steps."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 128
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 4
  c.model.d_ff = 384
  c.model.tie_embeddings = False
  c.model.dtype = "float32"  # compute dtype of matmul inputs; accumulation is always f32
  c.model.param_dtype = "float32"
  c.model.rope_base = 10_000.0
  c.model.norm_eps = 1e-6
  c.model.z_loss = 0.0  # weight of log(Z)^2, as in PaLM; 0 disables it
  c.model.scan_layers = False
  c.model.remat = "none"  # none | full | dots (save matmul outputs) | dots_no_batch
  # Training attention (lm.kernels): auto (splash on TPU, cuDNN on GPU where shapes allow, else xla) | xla |
  # splash (Pallas, TPU) | cudnn (GPU)
  c.model.attention = "auto"
  c.model.lora_rank = 0  # > 0: LoRA adapters of this rank; only they train (lm.lora)
  c.model.lora_alpha = 16.0  # adapters scale by lora_alpha / lora_rank
  c.model.lora_targets = LORA_TARGETS  # the projections adapted
  # Mixture of experts (lm.model.MoE): routed SwiGLU experts in place of the MLP of every `every`-th layer.
  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.experts = 0  # routed experts per MoE layer; 0: a dense model
  c.model.moe.top_k = 2  # experts each token is routed to
  c.model.moe.every = 1  # layer i (from 0) is MoE when (i + 1) % every == 0: 1 = all, 2 = every second
  c.model.moe.shared_experts = 0  # experts every token also goes through (DeepSeek's), each moe.d_ff wide
  c.model.moe.d_ff = 0  # each expert's hidden width; 0: model.d_ff
  c.model.moe.capacity_factor = 1.25  # slots per expert = ceil(factor * group tokens * top_k / experts); 0: dropless
  c.model.moe.group_size = 0  # tokens routed together (capacity is per group); 0: one row
  c.model.moe.renormalize = True  # top-k weights renormalised to sum to 1 (Mixtral); False: raw softmax weights
  c.model.moe.router_dtype = "float32"  # the router's logits and softmax
  c.model.moe.aux_loss = 0.01  # load-balancing loss weight (Switch: experts * sum_e load_e * mean prob_e)
  c.model.moe.z_loss = 0.001  # router z-loss weight (ST-MoE: mean logsumexp(router logits)^2)

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"
  c.data.seq_len = 128
  c.data.eval_fraction = 0.01
  c.data.eval_split = "hash"  # hash: held-out documents chosen by a hash of their identity | tail: the last ones
  c.data.eval_sources = ()  # "NAME=SOURCE" (its held-out documents) or "NAME=all:SOURCE", evaluated beside the split
  c.data.eval_min_tokens = 20_000  # warn when an eval set holds fewer target tokens
  c.data.text_field = "text"  # the field read by jsonl: and tfds: sources
  c.data.cache_dir = ""  # prepared TFDS datasets; empty = $LM_DATA_DIR or ~/.cache/lm/tfds
  c.data.max_bytes = 0  # read at most this many bytes of the source; 0 = all of it
  c.data.worker_threads = 2  # grain read/tokenize threads
  c.data.shuffle = "global"  # global: every epoch's packed rows in a random order | window: streamed, shuffle_window
  c.data.shuffle_window = 1024  # window: packed train rows shuffled together (over all shards)
  c.data.shards = 0  # train-data shards, fixed for a run's life; 0: its first start's process count
  # Post-training data (lm.data.post): conversations (objective lm: SFT) or preference pairs (reward, dpo), as
  # jsonl:GLOB or tfds:NAME; when set it replaces data.source. Held out: data.eval_fraction by a hash, or:
  c.data.post_source = ""
  c.data.post_eval_source = ""  # a separate eval file instead of the hash split
  c.data.overlong = "truncate"  # an example longer than data.seq_len: truncate | drop | error

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"  # sentencepiece | byte | huggingface (comes with `lm import hf`, not trained)
  c.tokenizer.vocab_size = 4096  # ignored by byte (256 + specials); huggingface: the imported model's vocabulary
  c.tokenizer.train_bytes = 8_000_000  # corpus bytes sampled to train sentencepiece
  # A tokenizer directory (`lm tokenizer train --out DIR`, or a run's workdir) a new run copies instead of training
  # one; its kind and vocab_size must be the ones above. "": train one. A resumed run keeps its own.
  c.tokenizer.path = ""

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global, in sequences
  c.train.steps = 200
  c.train.max_tokens = 0  # if > 0, the run is this many tokens long (its lr schedule too), if shorter than steps
  c.train.max_flops = 0.0  # if > 0, the run is this many training FLOPs long (its lr schedule too), if shorter
  c.train.stop_at_step = 0  # if > 0, stop (and checkpoint) after this step, leaving the run's length and schedule
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.eval_next_train_batches = True  # each eval also scores the next train batches, before training on them
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 3
  c.train.seed = 0
  c.train.flops_convention = "6N+attn"
  c.train.max_bad_steps = 5  # stop after this many consecutive steps with a non-finite loss or gradient
  c.train.min_free_bytes = -1  # refuse to start with less free disk in the workdir; -1: two checkpoints, 0: off
  c.train.debug_nan_steps = ""  # fault injection: comma-separated steps whose batch is poisoned with NaN
  c.train.objective = "lm"  # what the run learns: a name in lm.objectives.REGISTRY (lm: next-token prediction)
  # A new run starts from another: DIR (a run directory) gives the params of its newest good checkpoint, the
  # optimizer and step starting fresh; DIR/checkpoints/STEP continues that state exactly (a cooldown branch).
  c.train.init_from = ""
  c.train.loss_on = "assistant"  # SFT: the loss counts assistant turns (assistant), the last one (last), or all
  c.train.sample_prompts = ()  # texts completed at every eval, logged as samples/i; empty: no samples
  c.train.sample_tokens = 32  # new tokens per sample (a prompt too long for the context keeps its end)
  c.train.sample_temperature = 0.0  # 0: greedy
  c.train.evals = ()  # downstream tasks run at every eval (as `lm eval --tasks`), logged as eval/TASK/METRIC
  c.train.evals_shots = 0  # few-shot examples before each of their examples
  c.train.evals_limit = 100  # at most this many examples per task (0: all)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.final_lr_fraction = 0.1
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"  # cosine | wsd | constant
  c.optim.cooldown_fraction = 0.2  # wsd: the last fraction of steps decays
  c.optim.cooldown_shape = "linear"  # wsd: linear | 1-sqrt
  c.optim.weight_decay = 0.1
  c.optim.decay_norms = False
  c.optim.decay_embeddings = False
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0  # 0 disables clipping
  c.optim.grad_accum_steps = 1
  c.optim.trainable = ""  # a regex: only params whose path ("layer_3/attn/wq") it matches train; "": all

  c.reward = ml_collections.ConfigDict()  # objective reward: Bradley-Terry on preference pairs
  c.reward.center_coef = 0.0  # weight of the reward-centering term mean((r_chosen + r_rejected)^2)

  c.dpo = ml_collections.ConfigDict()  # objective dpo
  c.dpo.beta = 0.1
  c.dpo.loss = "sigmoid"  # sigmoid (DPO) | ipo | hinge
  c.dpo.label_smoothing = 0.0  # sigmoid only: the assumed share of flipped labels (cDPO)
  c.dpo.rpo_alpha = 0.0  # > 0: add this times the chosen reply's NLL per token (RPO)
  c.dpo.reference = "step"  # the reference log-probs: computed in each step, or "precomputed" once per example

  c.rl = ml_collections.ConfigDict()  # objectives ppo and grpo (lm.objectives.rl): prompts in data.post_source
  c.rl.reward_model = ""  # a reward-model run (train.objective=reward) that scores responses, or
  c.rl.reward_fn = ""  # module:function(prompt, response, metadata) -> float, a reward a program computes
  c.rl.max_new_tokens = 32  # the response length limit of a rollout
  c.rl.temperature = 1.0  # rollout sampling temperature
  c.rl.group_size = 1  # responses per prompt (GRPO's group; > 1 for grpo)
  c.rl.num_minibatches = 1  # a rollout is train.batch_size * num_minibatches rows, one minibatch a step
  c.rl.ppo_epochs = 1  # passes over each rollout: a rollout every ppo_epochs * num_minibatches steps
  c.rl.cliprange = 0.2  # the policy ratio's clip
  c.rl.kl_coef = 0.05  # PPO: the KL penalty in the reward; GRPO: beta, the KL term of the loss
  c.rl.kl_target = 0.0  # PPO: > 0 adapts kl_coef towards this KL per response (Ziegler et al.)
  c.rl.kl_horizon = 10_000  # PPO: the adaptive controller's horizon, in responses
  c.rl.kl_estimator = "k1"  # k1 (log ratio) | k3 (non-negative, unbiased); GRPO uses k3 in its loss
  c.rl.missing_eos_penalty = 1.0  # subtracted from the score of a response that never ended its turn
  c.rl.cliprange_value = 0.2  # PPO: the value's clip around its rollout value
  c.rl.vf_coef = 0.1  # PPO: the value loss's weight
  c.rl.gamma = 1.0
  c.rl.lam = 0.95
  c.rl.whiten_rewards = False  # PPO: whiten the per-token rewards before GAE
  c.rl.scale_rewards = True  # GRPO: divide by the group's reward std (False: Dr. GRPO)
  c.rl.greedy_in_group = False  # GRPO: each group's first response is the policy's greedy one, the rest sampled
  c.rl.loss_aggregation = "token_mean"  # token_mean | sequence_mean (the mean of each response's token mean)
  c.rl.eval_prompts = 64  # held-out prompts answered greedily at each eval

  # lm data prepare (lm.data.prepare): a cleaning pipeline run with datatrove before training.
  c.prepare = ml_collections.ConfigDict()
  c.prepare.source = "stdlib"  # written like data.source; also parquet:GLOB
  c.prepare.text_field = "text"  # jsonl and parquet: the text's field
  c.prepare.limit = -1  # read at most this many documents; -1: all
  c.prepare.preset = "prose"  # prose | code | none: the filters
  c.prepare.exact_dedup = True  # drop documents whose normalised text equals an earlier one's
  c.prepare.minhash = True  # MinHash near-duplicate removal
  c.prepare.minhash_ngrams = 5  # word n-grams hashed
  c.prepare.minhash_buckets = 14  # b: bands; a pair at Jaccard s collides with prob 1 - (1 - s^r)^b
  c.prepare.minhash_hashes = 8  # r: hashes per bucket (14 x 8: 50% at s = 0.72, 95% at s = 0.80)
  c.prepare.decontaminate = ()  # "NAME=SOURCE" evaluation sets; documents sharing an n-gram with one go
  c.prepare.decontaminate_ngrams = 13  # words per n-gram, as GPT-3
  c.prepare.tasks = 2  # tasks per stage (shards of the input)
  c.prepare.workers = 2  # tasks run at once (local and ray)
  c.prepare.compression = "gzip"  # gzip | none: the output and removed files
  c.prepare.tokenizer = ""  # the report counts tokens with this tokenizer (or run) directory; empty: words
  c.prepare.samples_per_reason = 3  # removed documents quoted per reason in the report
  c.prepare.keep_work = False  # keep DIR/work (signatures, intermediate shards) after a local or ray run
  c.prepare.code = ml_collections.ConfigDict()  # preset=code: lm.data.prepare.CodeFilter's thresholds
  c.prepare.code.max_line_length = 1000
  c.prepare.code.max_mean_line_length = 100.0
  c.prepare.code.min_alnum_fraction = 0.25
  c.prepare.code.min_lines = 3
  c.prepare.slurm = ml_collections.ConfigDict()  # --executor slurm
  c.prepare.slurm.partition = "cpu"
  c.prepare.slurm.time = "04:00:00"
  c.prepare.slurm.cpus_per_task = 1
  c.prepare.slurm.mem_per_cpu_gb = 2
  c.prepare.slurm.venv_path = ""  # activated in each job; empty: the submitting shell's environment
  c.prepare.slurm.sbatch_args = ()  # extra "KEY=VALUE" #SBATCH directives, e.g. "account=myproj"
  c.prepare.ray = (
    ml_collections.ConfigDict()
  )  # --executor ray: a running cluster (ray.init(address=...)) or a local one
  c.prepare.ray.cpus_per_task = 1
  c.prepare.ray.mem_per_cpu_gb = 2.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: whatever devices the other axes leave
  c.mesh.expert = 1  # expert parallelism: MoE experts split over it; elsewhere it is one more data axis
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def load_config(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the experiment file at `path` and applies `key=value` overrides. A `.json` path is a
  run's saved `config.json` (an imported checkpoint's, say), read as it is."""
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  if path.endswith(".json"):
    try:
      cfg = from_json(open(path).read())
    except (ValueError, TypeError) as e:
      raise UserError(f"cannot read {path}: {e}") from None
    for item in overrides:
      apply_override(cfg, item)
    return cfg
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise UserError(f"{path} defines no get_config()")
  try:
    cfg = module.get_config()
  except UserError:
    raise
  except Exception as e:  # an experiment file is user code: report its error in one line
    raise UserError(f"{path}: get_config() raised {type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UserError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  cfg = merge_into_defaults(cfg)
  for item in overrides:
    apply_override(cfg, item)
  return cfg


def load_module(path: str):
  """Imports a Python file by path, reporting syntax and import errors in one line."""
  name = "lm_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise UserError(f"{path}: importing it raised {type(e).__name__}: {e}") from e
  sys.modules[name] = module
  return module


def merge_into_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns the defaults updated with `cfg`; a key the defaults lack is an error."""
  merged = default_config()
  for key, value in flatten(cfg.to_dict()).items():
    set_key(merged, key, value)
  return merged


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def set_key(cfg: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets dotted `key`, checking that it exists and that `value` has the default's type."""
  *parents, leaf = key.split(".")
  node = cfg
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise UserError(f"unknown config key: {key}")
    node = node[p]
  if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
    raise UserError(f"unknown config key: {key}")
  default = node[leaf]
  node[leaf] = coerce(key, value, type(default))


def coerce(key: str, value, kind: type):
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is tuple and isinstance(value, list | tuple):  # tuple keys hold strings; JSON gives lists
    if not all(isinstance(item, str) for item in value):
      raise UserError(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)
  if type(value) is not kind:
    raise UserError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
  return value


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `a.b=value` override; the value is parsed by the type of the key's default."""
  if "=" not in item:
    raise UserError(f"override must be KEY=VALUE, got {item!r}")
  key, text = item.split("=", 1)
  set_key(cfg, key, parse_value(key, text, type(get_key(cfg, key))))


def get_key(cfg: ml_collections.ConfigDict, key: str):
  node = cfg
  for p in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise UserError(f"unknown config key: {key}")
    node = node[p]
  return node


def parse_value(key: str, text: str, kind: type):
  try:
    if kind is bool:
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if kind is int:
      return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
    if kind is float:
      return float(text)
    if kind is tuple:
      value = json.loads(text)
      if not isinstance(value, list):
        raise ValueError
      return value
  except ValueError:
    kind_name = "a JSON list of strings" if kind is tuple else kind.__name__
    raise UserError(f"{key} must be {kind_name}, got {text!r}") from None
  return text


DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "wsd", "constant")
REMAT = ("none", "full", "dots", "dots_no_batch")
ATTENTION = ("auto", "xla", "splash", "cudnn")  # lm.kernels


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises UserError naming the first inconsistent key. `num_devices` enables mesh checks."""
  m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
  positive = {
    "model.d_model": m.d_model,
    "model.n_layers": m.n_layers,
    "model.n_heads": m.n_heads,
    "model.n_kv_heads": m.n_kv_heads,
    "model.d_ff": m.d_ff,
    "train.batch_size": t.batch_size,
    "train.steps": t.steps,
    "train.eval_every": t.eval_every,
    "train.eval_batches": t.eval_batches,
    "train.log_every": t.log_every,
    "train.checkpoint_every": t.checkpoint_every,
    "train.keep_checkpoints": t.keep_checkpoints,
    "train.max_bad_steps": t.max_bad_steps,
    "optim.lr": o.lr,
    "optim.grad_accum_steps": o.grad_accum_steps,
    "data.worker_threads": d.worker_threads,
  }
  for key, value in positive.items():
    if not value > 0:
      raise UserError(f"{key} must be positive, got {value}")
  if m.d_model % m.n_heads:
    raise UserError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
  if (m.d_model // m.n_heads) % 2:
    raise UserError(f"model.d_model / model.n_heads must be even for RoPE, got {m.d_model // m.n_heads}")
  if m.n_heads % m.n_kv_heads:
    raise UserError(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads ({m.n_kv_heads})")
  for key in ("model.dtype", "model.param_dtype"):
    if get_key(cfg, key) not in DTYPES:
      raise UserError(f"{key} must be one of {DTYPES}, got {get_key(cfg, key)!r}")
  if m.remat not in REMAT:
    raise UserError(f"model.remat must be one of {REMAT}, got {m.remat!r}")
  if m.attention not in ATTENTION:
    raise UserError(f"model.attention must be one of {ATTENTION}, got {m.attention!r}")
  if m.z_loss < 0:
    raise UserError(f"model.z_loss must be >= 0, got {m.z_loss}")
  _validate_moe(cfg)
  if d.seq_len < 2:
    raise UserError(f"data.seq_len must be at least 2, got {d.seq_len}")
  if not 0.0 < d.eval_fraction < 1.0:
    raise UserError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
  if d.max_bytes < 0:
    raise UserError(f"data.max_bytes must be >= 0, got {d.max_bytes}")
  if d.eval_split not in ("hash", "tail"):
    raise UserError(f"data.eval_split must be 'hash' or 'tail', got {d.eval_split!r}")
  if d.shuffle not in ("global", "window"):
    raise UserError(f"data.shuffle must be 'global' or 'window', got {d.shuffle!r}")
  eval_sources(cfg)
  if d.shuffle_window < 0:
    raise UserError(f"data.shuffle_window must be >= 0, got {d.shuffle_window}")
  if d.shards < 0:
    raise UserError(f"data.shards must be >= 0, got {d.shards}")
  if d.shards and t.batch_size % d.shards:
    raise UserError(f"train.batch_size ({t.batch_size}) must be divisible by data.shards ({d.shards})")
  if cfg.tokenizer.kind not in TOKENIZER_KINDS:
    raise UserError(f"tokenizer.kind must be one of {', '.join(TOKENIZER_KINDS)}, got {cfg.tokenizer.kind!r}")
  if cfg.tokenizer.kind == "sentencepiece" and not 300 <= cfg.tokenizer.vocab_size <= 1_000_000:
    raise UserError(f"tokenizer.vocab_size must be in [300, 1000000], got {cfg.tokenizer.vocab_size}")
  if t.evals_shots < 0 or t.evals_limit < 0:
    raise UserError("train.evals_shots and train.evals_limit must be >= 0")
  if t.sample_prompts:
    if not all(t.sample_prompts):
      raise UserError("train.sample_prompts must not hold an empty prompt")
    if not 1 <= t.sample_tokens < d.seq_len:
      raise UserError(f"train.sample_tokens must be in [1, data.seq_len), got {t.sample_tokens}")
    if t.sample_temperature < 0:
      raise UserError(f"train.sample_temperature must be >= 0, got {t.sample_temperature}")
  if t.min_free_bytes < -1:
    raise UserError(f"train.min_free_bytes must be >= -1, got {t.min_free_bytes}")
  debug_nan_steps(cfg)
  if t.init_from != t.init_from.strip():
    raise UserError(f"train.init_from must be a run directory or DIR/checkpoints/STEP, got {t.init_from!r}")
  if m.lora_rank < 0 or m.lora_alpha <= 0:
    raise UserError(f"model.lora_rank must be >= 0 and model.lora_alpha > 0, got {m.lora_rank}, {m.lora_alpha}")
  bad = set(m.lora_targets) - set(LORA_TARGETS)
  if m.lora_rank and (bad or not m.lora_targets):
    raise UserError(f"model.lora_targets must be a non-empty subset of {LORA_TARGETS}, got {tuple(m.lora_targets)}")
  if d.overlong not in ("truncate", "drop", "error"):
    raise UserError(f"data.overlong must be 'truncate', 'drop' or 'error', got {d.overlong!r}")
  if t.loss_on not in ("assistant", "last", "all"):
    raise UserError(f"train.loss_on must be 'assistant', 'last' or 'all', got {t.loss_on!r}")
  if d.post_eval_source and not d.post_source:
    raise UserError("data.post_eval_source needs data.post_source")
  if cfg.dpo.beta <= 0 or not 0.0 <= cfg.dpo.label_smoothing < 0.5:
    raise UserError(
      f"dpo.beta must be > 0 and dpo.label_smoothing in [0, 0.5), got {cfg.dpo.beta}, {cfg.dpo.label_smoothing}"
    )
  if cfg.dpo.loss not in ("sigmoid", "ipo", "hinge"):
    raise UserError(f"dpo.loss must be 'sigmoid', 'ipo' or 'hinge', got {cfg.dpo.loss!r}")
  if cfg.dpo.label_smoothing and cfg.dpo.loss != "sigmoid":
    raise UserError(f"dpo.label_smoothing applies to dpo.loss 'sigmoid' only, not {cfg.dpo.loss!r}")
  if cfg.dpo.rpo_alpha < 0:
    raise UserError(f"dpo.rpo_alpha must be >= 0, got {cfg.dpo.rpo_alpha}")
  if cfg.dpo.reference not in ("step", "precomputed"):
    raise UserError(f"dpo.reference must be 'step' or 'precomputed', got {cfg.dpo.reference!r}")
  _validate_rl(cfg)
  if cfg.reward.center_coef < 0:
    raise UserError(f"reward.center_coef must be >= 0, got {cfg.reward.center_coef}")
  from lm import objectives  # noqa: PLC0415 (import-light: the registry holds names)

  objectives.check(cfg)
  if t.max_tokens < 0 or t.max_flops < 0:
    raise UserError("train.max_tokens and train.max_flops must be >= 0")
  if t.stop_at_step < 0:
    raise UserError(f"train.stop_at_step must be >= 0, got {t.stop_at_step}")
  if o.schedule not in SCHEDULES:
    raise UserError(f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
  if o.warmup_steps < 0:
    raise UserError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
  if not 0.0 <= o.final_lr_fraction <= 1.0:
    raise UserError(f"optim.final_lr_fraction must be in [0, 1], got {o.final_lr_fraction}")
  if not 0.0 <= o.cooldown_fraction <= 1.0:
    raise UserError(f"optim.cooldown_fraction must be in [0, 1], got {o.cooldown_fraction}")
  if o.cooldown_shape not in ("linear", "1-sqrt"):
    raise UserError(f"optim.cooldown_shape must be 'linear' or '1-sqrt', got {o.cooldown_shape!r}")
  for key in ("optim.b1", "optim.b2"):
    if not 0.0 <= get_key(cfg, key) < 1.0:
      raise UserError(f"{key} must be in [0, 1), got {get_key(cfg, key)}")
  if o.weight_decay < 0 or o.clip_norm < 0:
    raise UserError("optim.weight_decay and optim.clip_norm must be >= 0")
  if t.batch_size % o.grad_accum_steps:
    raise UserError(
      f"train.batch_size ({t.batch_size}) must be divisible by optim.grad_accum_steps ({o.grad_accum_steps})"
    )
  from lm import flops  # noqa: PLC0415 (flops imports nothing heavy, but config must stay import-light)

  if t.flops_convention not in flops.CONVENTIONS:
    raise UserError(f"train.flops_convention must be one of {tuple(flops.CONVENTIONS)}, got {t.flops_convention!r}")
  if num_devices is not None:
    data, expert, fsdp, tensor = mesh_shape(cfg, num_devices)
    microbatch = t.batch_size // o.grad_accum_steps
    if microbatch % (data * expert * fsdp):
      raise UserError(
        f"train.batch_size / optim.grad_accum_steps ({microbatch}) must be divisible by the "
        f"{data * expert * fsdp} data-parallel devices (mesh.data x mesh.expert x mesh.fsdp)"
      )
    if m.n_kv_heads % tensor and m.n_heads % tensor:
      raise UserError(f"model.n_heads ({m.n_heads}) must be divisible by mesh.tensor ({tensor})")
    if expert > 1 and m.moe.experts % expert:
      raise UserError(f"model.moe.experts ({m.moe.experts}) must be divisible by mesh.expert ({expert})")


def _validate_moe(cfg: ml_collections.ConfigDict) -> None:
  m, moe = cfg.model, cfg.model.moe
  if moe.experts < 0:
    raise UserError(f"model.moe.experts must be >= 0, got {moe.experts}")
  if not moe.experts:
    return
  if not 1 <= moe.top_k <= moe.experts:
    raise UserError(f"model.moe.top_k must be in [1, model.moe.experts={moe.experts}], got {moe.top_k}")
  if not 1 <= moe.every <= m.n_layers:
    raise UserError(f"model.moe.every must be in [1, model.n_layers={m.n_layers}], got {moe.every}")
  if m.scan_layers and moe.every != 1:
    raise UserError("model.scan_layers needs identical layers: set model.moe.every=1 or model.scan_layers=False")
  for key in ("shared_experts", "d_ff", "group_size"):
    if moe[key] < 0:
      raise UserError(f"model.moe.{key} must be >= 0, got {moe[key]}")
  for key in ("capacity_factor", "aux_loss", "z_loss"):
    if moe[key] < 0:
      raise UserError(f"model.moe.{key} must be >= 0, got {moe[key]}")
  if moe.router_dtype not in DTYPES:
    raise UserError(f"model.moe.router_dtype must be one of {DTYPES}, got {moe.router_dtype!r}")
  if moe.group_size and cfg.data.seq_len % moe.group_size:
    raise UserError(f"data.seq_len ({cfg.data.seq_len}) must be a multiple of model.moe.group_size ({moe.group_size})")
  if m.lora_rank and {"w_gate", "w_up", "w_down"} & set(m.lora_targets):
    raise UserError("LoRA on an MoE model adapts attention only: set model.lora_targets to some of wq, wk, wv, wo")


def eval_sources(cfg: ml_collections.ConfigDict) -> dict[str, tuple[str, bool]]:
  """`data.eval_sources` as {name: (source, whole)}; `whole` for `NAME=all:SOURCE`."""
  out = {}
  for item in cfg.data.eval_sources:
    name, _, source = item.partition("=")
    whole = source.startswith("all:")
    source = source.removeprefix("all:")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not source:
      raise UserError(f"data.eval_sources entries must be NAME=SOURCE or NAME=all:SOURCE, got {item!r}")
    if name in out:
      raise UserError(f"data.eval_sources names {name!r} twice")
    out[name] = (source, whole)
  return out


def init_from(cfg: ml_collections.ConfigDict) -> tuple[str, int | None]:
  """`train.init_from` as (run directory, step): STEP for DIR/checkpoints/STEP (a branch that continues that
  state), None for a run directory (the new run takes the params of its newest good checkpoint)."""
  text = cfg.train.init_from.rstrip("/")
  branch = re.fullmatch(r"(.+)/checkpoints/(\d+)", text)
  return (branch[1], int(branch[2])) if branch else (text, None)


def debug_nan_steps(cfg: ml_collections.ConfigDict) -> frozenset[int]:
  """The steps (1-based, as logged) that `train.debug_nan_steps` poisons."""
  text = cfg.train.debug_nan_steps.replace(" ", "")
  items = text.split(",") if text else []
  if not all(item.isdigit() and int(item) > 0 for item in items):
    raise UserError(f"train.debug_nan_steps must be comma-separated positive step numbers, got {text!r}")
  return frozenset(map(int, items))


MESH_AXES = ("data", "expert", "fsdp", "tensor")


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int, int]:
  """Resolves `mesh.{data,expert,fsdp,tensor}` (at most one -1) against the device count, in MESH_AXES order."""
  sizes = {f"mesh.{axis}": cfg.mesh[axis] for axis in MESH_AXES}
  free = [k for k, v in sizes.items() if v == -1]
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise UserError(f"{k} must be positive or -1, got {v}")
  if len(free) > 1:
    raise UserError(f"at most one mesh axis may be -1, got {', '.join(free)}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise UserError(f"{num_devices} devices do not divide into mesh axes of total size {fixed}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"mesh {tuple(sizes.values())} needs {fixed} devices, but {num_devices} are present")
  return tuple(sizes[f"mesh.{axis}"] for axis in MESH_AXES)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """A saved config; one from before the hash split and global shuffle keeps the data it was trained on."""
  saved = json.loads(text)
  data = saved.get("data")
  if isinstance(data, dict) and "shuffle" not in data:
    data.setdefault("eval_split", "tail")
    data["shuffle"] = "window"
  return merge_into_defaults(ml_collections.ConfigDict(saved))


# Keys a resumed run may change: they alter neither shapes, nor data, nor the optimizer.
RESUMABLE_KEYS = (
  "train.steps",
  "train.max_tokens",
  "train.max_flops",
  "train.stop_at_step",
  "train.eval_every",
  "train.eval_batches",
  "train.eval_next_train_batches",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.flops_convention",
  "train.max_bad_steps",
  "train.min_free_bytes",
  "train.debug_nan_steps",
  "train.init_from",
  "train.sample_prompts",
  "train.evals",
  "train.evals_shots",
  "train.evals_limit",
  "train.sample_tokens",
  "train.sample_temperature",
  "data.worker_threads",
  "data.cache_dir",
  "data.eval_sources",
  "data.eval_min_tokens",
  "tokenizer.path",
  "model.remat",
  "model.attention",
  "mesh.data",
  "mesh.expert",
  "mesh.fsdp",
  "mesh.tensor",
)


def incompatible_changes(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """Keys, as `key: old -> new`, whose change makes `new` unable to resume a run of `saved`."""
  old, cur = flatten(saved.to_dict()), flatten(new.to_dict())
  for flat in (old, cur):  # 0 (unresolved, or a run from before sharded reading) reads one shard in one process
    flat["data.shards"] = flat.get("data.shards") or 1
  return [
    f"{k}: {old.get(k)!r} -> {cur.get(k)!r}"
    for k in sorted(set(old) | set(cur))
    if k not in RESUMABLE_KEYS and old.get(k) != cur.get(k)
  ]


def _validate_rl(cfg) -> None:
  r, objective = cfg.rl, cfg.train.objective
  if objective not in ("ppo", "grpo"):
    return
  if bool(r.reward_model) == bool(r.reward_fn):
    raise UserError(f"train.objective={objective} needs exactly one of rl.reward_model (a run) and rl.reward_fn")
  if r.reward_fn and r.reward_fn.count(":") != 1:
    raise UserError(f"rl.reward_fn must be module:function, got {r.reward_fn!r}")
  if not 1 <= r.max_new_tokens < cfg.data.seq_len:
    raise UserError(f"rl.max_new_tokens must be in [1, data.seq_len), got {r.max_new_tokens}")
  if r.temperature <= 0:
    raise UserError(f"rl.temperature must be > 0 (rollouts sample), got {r.temperature}")
  if r.group_size < 1 or (objective == "grpo" and r.group_size < 2):
    raise UserError(f"rl.group_size must be >= 1, and >= 2 for grpo, got {r.group_size}")
  if r.num_minibatches < 1 or r.ppo_epochs < 1:
    raise UserError(f"rl.num_minibatches and rl.ppo_epochs must be >= 1, got {r.num_minibatches}, {r.ppo_epochs}")
  if (cfg.train.batch_size * r.num_minibatches) % r.group_size:
    raise UserError(
      f"a rollout's rows (train.batch_size * rl.num_minibatches = {cfg.train.batch_size * r.num_minibatches}) "
      f"must be a multiple of rl.group_size ({r.group_size})"
    )
  if r.cliprange <= 0 or r.cliprange_value <= 0:
    raise UserError(f"rl.cliprange and rl.cliprange_value must be > 0, got {r.cliprange}, {r.cliprange_value}")
  if r.kl_coef < 0 or r.kl_target < 0 or r.kl_horizon < 1 or r.vf_coef < 0:
    raise UserError("rl.kl_coef, rl.kl_target and rl.vf_coef must be >= 0 and rl.kl_horizon >= 1")
  if r.kl_estimator not in ("k1", "k3"):
    raise UserError(f"rl.kl_estimator must be 'k1' or 'k3', got {r.kl_estimator!r}")
  if not (0 <= r.gamma <= 1 and 0 <= r.lam <= 1):
    raise UserError(f"rl.gamma and rl.lam must be in [0, 1], got {r.gamma}, {r.lam}")
  if r.loss_aggregation not in ("token_mean", "sequence_mean"):
    raise UserError(f"rl.loss_aggregation must be 'token_mean' or 'sequence_mean', got {r.loss_aggregation!r}")
  if r.eval_prompts < 1:
    raise UserError(f"rl.eval_prompts must be >= 1, got {r.eval_prompts}")
  if not cfg.train.init_from:
    raise UserError(f"train.objective={objective} needs train.init_from: the run (an SFT model) the policy starts from")
  if not cfg.data.post_source:
    raise UserError(f"train.objective={objective} needs data.post_source: prompts (jsonl:GLOB or tfds:NAME)")
