"""Hugging Face interop: `lm export hf` writes a run as a Llama checkpoint, `lm import hf` reads one as a run.

lm's model is the Llama architecture (pre-norm RMSNorm blocks, RoPE on the two halves of each head,
grouped-query attention, a SwiGLU MLP, no biases), so every weight maps one to one; only layouts differ.
lm keeps a projection as [in, out] with the heads as their own axis, Hugging Face as a torch Linear's
[out, in] with the heads flattened:

  lm                                     Hugging Face (LlamaForCausalLM)
  embed [V, D]                           model.embed_tokens.weight [V, D]
  layer_i/attn_norm/scale [D]            model.layers.i.input_layernorm.weight [D]
  layer_i/attn/wq [D, H, E]              model.layers.i.self_attn.q_proj.weight [H*E, D]
  layer_i/attn/wk, wv [D, K, E]          ...k_proj.weight, v_proj.weight [K*E, D]
  layer_i/attn/wo [H, E, D]              ...o_proj.weight [D, H*E]
  layer_i/mlp_norm/scale [D]             model.layers.i.post_attention_layernorm.weight [D]
  layer_i/mlp/w_gate, w_up [D, F]        model.layers.i.mlp.gate_proj.weight, up_proj.weight [F, D]
  layer_i/mlp/w_down [F, D]              model.layers.i.mlp.down_proj.weight [D, F]
  final_norm/scale [D]                   model.norm.weight [D]
  head [D, V] (absent if tied)           lm_head.weight [V, D] (tie_word_embeddings)

A run with `scan_layers` stores the layers stacked under `layers/` with a leading [L] axis; export slices
it. What Llama cannot express is refused in one line: LoRA adapters (merge them first with `lm lora
merge`) and a reward model's scalar head. `model.z_loss` only shapes training and exports.

Import reads `config.json`, the safetensors weights (one file or sharded with an index) and
`tokenizer.json`. Each device's shard of each parameter is read from a memory-mapped safetensors slice
(`jax.make_array_from_callback`), so with FSDP or tensor sharding (`--config.mesh.fsdp=N`) no process ever
holds a whole tensor it does not keep, let alone the whole model. lm's chat tokens are appended to the
imported vocabulary (rows initialised to the mean of the existing ones, as `lm.tokenizer.grow_vocab`
does), so the run can be fine-tuned in lm's chat format at once; the checkpoint's own ids keep their rows
and their meaning. Refused in one line: model types other than llama and mistral, rope scaling, biases, a
sliding window shorter than the imported context, an activation other than silu, a head_dim other than
hidden_size / heads, and a checkpoint without tokenizer.json.
"""

import dataclasses
import json
import math
import os

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from lm import checkpoint as checkpoint_lib
from lm import config as config_lib
from lm import metrics as metrics_lib
from lm import partitioning, state
from lm import tokenizer as tokenizer_lib
from lm import workdir as workdir_lib
from lm.errors import UserError

MAX_SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}

# How an lm leaf's layout becomes the Hugging Face tensor's: "same"; "t" ([in, out] -> [out, in]);
# "heads_in" ([D, N, E] -> [N*E, D]); "heads_out" ([H, E, D] -> [D, H*E]).
_LAYER = {
  "attn_norm/scale": ("input_layernorm.weight", "same"),
  "attn/wq": ("self_attn.q_proj.weight", "heads_in"),
  "attn/wk": ("self_attn.k_proj.weight", "heads_in"),
  "attn/wv": ("self_attn.v_proj.weight", "heads_in"),
  "attn/wo": ("self_attn.o_proj.weight", "heads_out"),
  "mlp_norm/scale": ("post_attention_layernorm.weight", "same"),
  "mlp/w_gate": ("mlp.gate_proj.weight", "t"),
  "mlp/w_up": ("mlp.up_proj.weight", "t"),
  "mlp/w_down": ("mlp.down_proj.weight", "t"),
}
_TOP = {"embed": ("model.embed_tokens.weight", "same"), "final_norm/scale": ("model.norm.weight", "same")}


def weight_map(n_layers: int, tied: bool) -> dict[str, tuple[str, str]]:
  """lm leaf path (layers unstacked: `layer_i/...`) -> (Hugging Face name, layout change)."""
  names = dict(_TOP)
  for i in range(n_layers):
    names |= {f"layer_{i}/{k}": (f"model.layers.{i}.{hf}", how) for k, (hf, how) in _LAYER.items()}
  if not tied:
    names["head"] = ("lm_head.weight", "t")
  return names


def to_hf_layout(x: np.ndarray, how: str) -> np.ndarray:
  if how == "same":
    return x
  if how == "t":
    return x.T
  if how == "heads_in":
    return x.reshape(x.shape[0], -1).T
  assert how == "heads_out", how
  return x.reshape(-1, x.shape[-1]).T


def hf_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
  """The Hugging Face shape of an lm leaf of `shape` (see `to_hf_layout`)."""
  if how == "same":
    return tuple(shape)
  if how == "t":
    return tuple(shape[::-1])
  if how == "heads_in":
    return (math.prod(shape[1:]), shape[0])
  return (shape[-1], math.prod(shape[:-1]))


# ---------------------------------------------------------------------------------------------------- export


def llama_config(cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, vocab: int, dtype: str) -> dict:
  """The `config.json` of a run's model as a LlamaConfig (what transformers 4.x and 5.x both read)."""
  m = cfg.model
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": vocab,
    "hidden_size": m.d_model,
    "intermediate_size": m.d_ff,
    "num_hidden_layers": m.n_layers,
    "num_attention_heads": m.n_heads,
    "num_key_value_heads": m.n_kv_heads,
    "head_dim": m.d_model // m.n_heads,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.data.seq_len,
    "rms_norm_eps": m.norm_eps,
    "rope_theta": m.rope_base,
    "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": m.tie_embeddings,
    "bos_token_id": tok.bos_id,
    "eos_token_id": tok.eos_id,
    "pad_token_id": tok.pad_id,
    "initializer_range": 0.02,
    "use_cache": True,
    "dtype": dtype,
    "torch_dtype": dtype,
  }


def check_exportable(cfg: ml_collections.ConfigDict) -> None:
  """UserError naming what Hugging Face's Llama cannot compute the way this run's model does."""
  if cfg.model.lora_rank:
    raise UserError("the run has LoRA adapters (model.lora_rank > 0): fold them in with `lm lora merge` first")
  if cfg.train.objective == "reward":
    raise UserError("the run is a reward model (a scalar head): Hugging Face's LlamaForCausalLM has an LM head")
  if cfg.model.moe.experts:
    raise UserError("the run is a mixture of experts (model.moe.experts > 0): lm exports dense Llama models only")


def export_hf(
  workdir: str, out: str, step: int | None = None, dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES
) -> dict:
  """Writes the run's newest good checkpoint (or checkpoint `step`) into `out` as a Hugging Face Llama model:
  config.json, generation_config.json, safetensors weights (sharded with an index above `max_shard_bytes`)
  and the tokenizer (`lm.hf_tokenizer`). Returns {step, files, params, vocab}. UserError before writing if
  `out` is a non-empty directory or the run cannot be exported."""
  from lm import hf_tokenizer  # noqa: PLC0415

  target = epath.Path(out)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise UserError(f"--out {out} exists and is not an empty directory")
  if dtype not in DTYPES:
    raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  cfg, _ = workdir_lib.load_run(workdir)
  check_exportable(cfg)
  cfg, tok, setup, restored = workdir_lib.load_checkpoint(workdir, step)
  params = traverse_util.flatten_dict(unstack_layers(restored.state.params, cfg.model.n_layers), sep="/")
  # Specials the tokenizer gained after the model was saved (`tok.added`) get rows, as a new run's would.
  if tok.vocab_size > tok.loaded_vocab_size:
    grown = tokenizer_lib.grow_vocab(
      {k: params[k] for k in ("embed", "head") if k in params}, tok.loaded_vocab_size, tok.vocab_size
    )
    params |= grown
  names = weight_map(cfg.model.n_layers, cfg.model.tie_embeddings)
  assert set(names) == set(params), sorted(set(names) ^ set(params))
  np_dtype = DTYPES[dtype]
  sizes = {k: math.prod(params[k].shape) * np.dtype(np_dtype).itemsize for k in names}
  shards = _plan_shards(list(names), sizes, max_shard_bytes)
  target.mkdir(parents=True, exist_ok=True)
  files = _write_weights(target, shards, names, params, np_dtype)
  config = llama_config(cfg, tok, tok.vocab_size, dtype)
  metrics_lib.replace_text(target / "config.json", json.dumps(config, indent=2) + "\n")
  stop = [tok.eos_id] + [tok.special["<|end|>"]] * ("<|end|>" in tok.special)
  generation = {"bos_token_id": tok.bos_id, "eos_token_id": stop, "pad_token_id": tok.pad_id}
  metrics_lib.replace_text(target / "generation_config.json", json.dumps(generation, indent=2) + "\n")
  hf_tokenizer.save_pretrained(tok, str(target), model_max_length=cfg.data.seq_len)
  return {"step": restored.step, "files": files, "params": sum(math.prod(p.shape) for p in params.values())}


def unstack_layers(params: dict, n_layers: int) -> dict:
  """A run's params with scanned layers (`layers/...` [L, ...]) as `layer_i/...`; others as they are."""
  if "layers" not in params:
    return params
  rest = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n_layers):
    rest[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return rest


def _plan_shards(keys: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
  """Consecutive groups of `keys` of at most `limit` bytes each (a larger tensor alone)."""
  shards, current, used = [], [], 0
  for k in keys:
    if current and used + sizes[k] > limit:
      shards.append(current)
      current, used = [], 0
    current.append(k)
    used += sizes[k]
  return shards + [current] if current else shards


def _write_weights(target: epath.Path, shards: list[list[str]], names: dict, params: dict, np_dtype) -> list[str]:
  """Writes each shard's tensors (one shard in memory at a time); the index file if there are several."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  n = len(shards)
  files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  weight_files, total = {}, 0
  for file, keys in zip(files, shards, strict=True):
    tensors = {}
    for k in keys:
      hf_name, how = names[k]
      x = np.asarray(jax.device_get(params[k]), np.float32)
      tensors[hf_name] = np.ascontiguousarray(to_hf_layout(x, how).astype(np_dtype))
      weight_files[hf_name] = file
      total += tensors[hf_name].nbytes
    save_file(tensors, str(target / file), metadata={"format": "pt"})
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_files.items()))}
    metrics_lib.replace_text(target / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
  return files


# ---------------------------------------------------------------------------------------------------- import


@dataclasses.dataclass(frozen=True)
class HFModel:
  """What `lm import hf` reads of a checkpoint directory, before any weight."""

  model: dict  # lm's model.* keys
  vocab_size: int
  max_positions: int
  sliding_window: int | None
  config: dict  # config.json as it is


def read_config(path: epath.Path) -> HFModel:
  """The model settings of the Hugging Face checkpoint in `path`; UserError naming what lm cannot run."""
  file = path / "config.json"
  if not file.exists():
    raise UserError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
  c = json.loads(file.read_text())
  kind = c.get("model_type")
  if kind not in MODEL_TYPES:
    raise UserError(f"model_type {kind!r} is not supported (lm imports {', '.join(MODEL_TYPES)})")
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default" or (c.get("rope_scaling") and c["rope_scaling"].get("rope_type", "default") != "default"):
    raise UserError(f"rope scaling type {rope_type!r} is not supported (lm's RoPE has no scaling)")
  for key in ("attention_bias", "mlp_bias"):
    if c.get(key):
      raise UserError(f"{key}=true is not supported (lm's projections have no biases)")
  if c.get("hidden_act", "silu") != "silu":
    raise UserError(f"hidden_act {c['hidden_act']!r} is not supported (lm's MLP is SwiGLU with silu)")
  d, heads = c["hidden_size"], c["num_attention_heads"]
  if c.get("head_dim") not in (None, d // heads) or d % heads:
    raise UserError(f"head_dim {c.get('head_dim')} is not hidden_size / num_attention_heads, which lm requires")
  theta = rope.get("rope_theta", c.get("rope_theta", 10_000.0))
  model = {
    "d_model": d,
    "n_layers": c["num_hidden_layers"],
    "n_heads": heads,
    "n_kv_heads": c.get("num_key_value_heads") or heads,
    "d_ff": c["intermediate_size"],
    "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
    "rope_base": float(theta),
    "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
  }
  return HFModel(model, c["vocab_size"], c.get("max_position_embeddings", 2048), c.get("sliding_window"), c)


def read_tokenizer(path: epath.Path, hf: HFModel) -> tokenizer_lib.HuggingFaceTokenizer:
  """The checkpoint's tokenizer.json as an lm tokenizer; <bos>, <eos> and <pad> from tokenizer_config.json,
  else config.json (pad defaults to eos), and lm's chat tokens where it holds them."""
  import tokenizers  # noqa: PLC0415

  file = path / "tokenizer.json"
  if not file.exists():
    raise UserError(f"{path} has no tokenizer.json (lm reads Hugging Face's fast tokenizer files)")
  model = file.read_bytes()
  tk = tokenizers.Tokenizer.from_str(model.decode())
  settings = path / "tokenizer_config.json"
  settings = json.loads(settings.read_text()) if settings.exists() else {}

  def token_id(key: str) -> int | None:
    token = settings.get(f"{key}_token")
    if isinstance(token, dict):
      token = token.get("content")
    if token is not None and tk.token_to_id(token) is not None:
      return tk.token_to_id(token)
    found = hf.config.get(f"{key}_token_id")
    return found[0] if isinstance(found, list) else found

  bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
  if bos is None or eos is None:
    raise UserError(f"the tokenizer in {path} has no {'beginning' if bos is None else 'end'}-of-sequence token")
  reserved = {"<pad>": eos if pad is None else pad, "<bos>": bos, "<eos>": eos}
  # lm's chat tokens, where the checkpoint has them (one lm exported): a chat-tuned run comes back whole.
  reserved |= {
    name: tk.token_to_id(name) for name in tokenizer_lib.SPECIAL_TOKENS[3:] if tk.token_to_id(name) is not None
  }
  return tokenizer_lib.HuggingFaceTokenizer(model, reserved, hf.vocab_size)


class Weights:
  """The safetensors files of a checkpoint, opened memory-mapped: `slice(name)` reads parts of a tensor."""

  def __init__(self, path: epath.Path):
    from safetensors import safe_open  # noqa: PLC0415

    index = path / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
      files = ["model.safetensors"]
    else:
      raise UserError(f"{path} holds no safetensors weights (model.safetensors or its index)")
    self._files = [safe_open(str(path / f), framework="numpy") for f in files]
    self._where = {name: f for f in self._files for name in f.keys()}
    self.largest_read = 0  # elements, the largest single read: what one device's shard costs
    self._means = {}

  def names(self) -> set[str]:
    return set(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name].get_slice(name).get_shape())

  def mean_row(self, name: str, rows: int, c0: int, c1: int) -> np.ndarray:
    """The mean of the first `rows` rows of `name` [rows, D] over columns [c0, c1), in f32, read 4,096 rows at a
    time (the table is never read whole) and kept for the other devices' shards."""
    key = (name, rows, c0, c1)
    if key not in self._means:
      total = np.zeros(c1 - c0, np.float64)
      for lo in range(0, rows, 4096):
        total += self.read(name, (slice(lo, min(lo + 4096, rows)), slice(c0, c1))).sum(axis=0, dtype=np.float64)
      self._means[key] = (total / rows).astype(np.float32)
    return self._means[key]

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """The rectangle `index` (slices) of tensor `name`, in f32."""
    part = self._where[name].get_slice(name)[index]
    self.largest_read = max(self.largest_read, part.size)
    return np.asarray(part, np.float32)


def _bounds(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
  return [(s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=True)]


def read_leaf(weights: Weights, name: str, how: str, shape: tuple[int, ...], index: tuple, rows: int) -> np.ndarray:
  """Part `index` of the lm leaf of `shape` stored as Hugging Face tensor `name` (layout `how`), reading only
  what it needs. `rows` is the checkpoint's vocabulary: a vocab axis beyond it (lm's added tokens) reads the
  mean of the existing rows."""
  bounds = _bounds(index, shape)
  if how == "same":
    if name in (_TOP["embed"][0],) and bounds[0][1] > rows:
      return _with_mean_rows(weights, name, bounds, rows, axis=0)
    return weights.read(name, tuple(slice(a, b) for a, b in bounds))
  if how == "t":
    (i0, i1), (o0, o1) = bounds
    if name == "lm_head.weight" and o1 > rows:
      return _with_mean_rows(weights, name, [(o0, o1), (i0, i1)], rows, axis=0).T
    return weights.read(name, (slice(o0, o1), slice(i0, i1))).T
  if how == "heads_in":  # lm [D, N, E] <- [N*E, D]
    (d0, d1), (n0, n1), (e0, e1) = bounds
    e = shape[2]
    w = weights.read(name, (slice(n0 * e, n1 * e), slice(d0, d1))).reshape(n1 - n0, e, d1 - d0)
    return w[:, e0:e1].transpose(2, 0, 1)
  assert how == "heads_out", how  # lm [H, E, D] <- [D, H*E]
  (h0, h1), (e0, e1), (d0, d1) = bounds
  e = shape[1]
  w = weights.read(name, (slice(d0, d1), slice(h0 * e, h1 * e))).reshape(d1 - d0, h1 - h0, e)
  return w[:, :, e0:e1].transpose(1, 2, 0)


def _with_mean_rows(weights: Weights, name: str, bounds, rows: int, axis: int) -> np.ndarray:
  """Rows bounds[0] of tensor `name` [rows, D] (columns bounds[1]); rows from `rows` on are the mean row."""
  assert axis == 0
  (r0, r1), (c0, c1) = bounds
  real = weights.read(name, (slice(r0, min(r1, rows)), slice(c0, c1))) if r0 < rows else np.zeros((0, c1 - c0))
  extra = r1 - max(r0, rows)
  mean_1xC = weights.mean_row(name, rows, c0, c1)[None]
  return np.concatenate([real, np.repeat(mean_1xC, extra, axis=0)]).astype(np.float32)


def import_hf(source: str, workdir: str, overrides: list[str] = (), seq_len: int | None = None) -> dict:
  """Writes the Hugging Face Llama checkpoint in `source` as an lm run in `workdir`: config.json (model keys
  from the checkpoint, `overrides` applied), the tokenizer (kind huggingface, lm's chat tokens appended),
  imported_from.json, and checkpoint 0 holding the params (fresh optimizer moments, no data position).
  Returns {step, params, vocab, added, largest_read}. UserError, before anything is written, for what lm
  cannot run or an existing `workdir`."""
  path, target = epath.Path(source), epath.Path(workdir)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise UserError(f"--workdir {workdir} exists and is not an empty directory")
  hf = read_config(path)
  seq_len = seq_len or min(hf.max_positions, 2048)
  if hf.sliding_window is not None and hf.sliding_window < seq_len:
    raise UserError(
      f"sliding_window {hf.sliding_window} is shorter than the context {seq_len} (lm has no sliding-window "
      "attention); import with --seq-len at most the window"
    )
  tok = read_tokenizer(path, hf)
  rows = hf.vocab_size
  tok.add_special([name for name in tokenizer_lib.SPECIAL_TOKENS if name not in tok.special])
  tok.loaded_vocab_size = tok.vocab_size
  cfg = config_lib.default_config()
  for key, value in hf.model.items():
    cfg.model[key] = value
  cfg.tokenizer.kind, cfg.tokenizer.vocab_size = "huggingface", tok.vocab_size
  cfg.data.seq_len = seq_len
  for item in overrides:
    config_lib.apply_override(cfg, item)
  config_lib.validate(cfg, jax.device_count())
  weights = Weights(path)
  names = weight_map(cfg.model.n_layers, cfg.model.tie_embeddings)
  missing = sorted({hf_name for hf_name, _ in names.values()} - weights.names())
  if missing:
    raise UserError(f"the checkpoint lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
  unused = sorted(n for n in weights.names() - {hf_name for hf_name, _ in names.values()} if "rotary" not in n)
  if unused:
    raise UserError(f"the checkpoint has weights lm's Llama has no place for: {', '.join(unused[:3])}")

  setup = state.build(cfg, tok.vocab_size, partitioning.make_mesh(cfg))
  if "layers" in setup.abstract_state.params:
    raise UserError("import with model.scan_layers=false (the default); a scanned copy can start from it later")
  shardings = traverse_util.flatten_dict(setup.state_shardings.params, sep="/")
  abstract = traverse_util.flatten_dict(setup.abstract_state.params, sep="/")
  flat = {}
  for key, (hf_name, how) in names.items():
    shape = abstract[key].shape
    want = hf_shape(shape, how)
    if key in ("embed", "head"):  # the vocabulary axis: the checkpoint's rows, without lm's added tokens
      want = (rows, *want[1:])
    if weights.shape(hf_name) != want:
      raise UserError(f"{hf_name} has shape {weights.shape(hf_name)}, but its config.json says {want}")

    def callback(index, hf_name=hf_name, how=how, shape=shape):
      return read_leaf(weights, hf_name, how, shape, index, rows)

    flat[key] = jax.make_array_from_callback(shape, shardings[key], callback)
  params = traverse_util.unflatten_dict(flat, sep="/")
  with setup.context():
    fresh = setup.init_state(params)
  record = {
    "from": str(path.absolute()),
    "model_type": hf.config["model_type"],
    "vocab": rows,
    "added_tokens": list(tok.added),
    "config": hf.config,
  }
  workdir_lib.write_workdir(cfg, target, tok)
  metrics_lib.replace_text(target / "imported_from.json", json.dumps(record, indent=2) + "\n")
  meta = {**workdir_lib.checkpoint_meta(cfg, tok), "imported_from": {k: v for k, v in record.items() if k != "config"}}
  ckpt = checkpoint_lib.Checkpointer(os.path.abspath(workdir), keep=1)
  try:
    ckpt.save(0, fresh, {}, meta, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  n_params = sum(math.prod(x.shape) for x in flat.values())
  added = list(tok.added)
  return {"step": 0, "params": n_params, "vocab": tok.vocab_size, "added": added, "largest_read": weights.largest_read}
