import dataclasses
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from lm import flops, lora, partitioning, plan, state
from lm.model import ModelConfig, Transformer, head_loss, init_cache, trunk_params
from lm.scaling import accounting

from conftest import random_batch, tiny_config

V = 97
BASE = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def init(cfg, seed=0):
  return nn.unbox(Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, 16), jnp.int32))["params"])


def with_leaves(params, values):
  """`params` with the leaves `values` holds replaced (as `lm.state` starts a run from another's params)."""
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(values)})


def logits(cfg, params, batch):
  return Transformer(cfg).apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])


def perturbed(params):
  """`params` with every adapter's B random (at init B is zero)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  keys = iter(jax.random.split(jax.random.key(7), len(leaves)))

  def perturb(path, x):
    return 0.1 * jax.random.normal(next(keys), x.shape) if path[-1].key.endswith("_lora_b") else x

  return jax.tree_util.tree_map_with_path(perturb, params)


def adapter_names(params) -> set[str]:
  return {"/".join(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_fresh_adapters_leave_the_base_models_logits_exactly():
  cfg = dataclasses.replace(BASE, lora_rank=4)
  base_params, params = init(BASE, seed=1), init(cfg)
  params = with_leaves(params, trunk_params(params, base_params))  # the base run's weights, fresh adapters
  batch = random_batch(3, 16, V, split=6)
  np.testing.assert_array_equal(logits(cfg, params, batch), logits(BASE, base_params, batch))
  with pytest.raises(ValueError, match="merge them first"):  # a LoRA run's params need merging for a base model
    trunk_params(base_params, params)
  jax.tree.map(np.testing.assert_array_equal, trunk_params(base_params, lora.merge_lora(params, cfg)), base_params)
  # With the same seed the adapter model's base weights are the base model's own initial weights.
  jax.tree.map(np.testing.assert_array_equal, lora.partition(init(cfg, seed=1))[1], base_params)


@pytest.mark.parametrize("scan", [False, True])
def test_merged_params_compute_the_adapted_function(scan):
  cfg = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, scan_layers=scan)
  params = perturbed(init(cfg))
  batch = random_batch(2, 16, V)
  adapted = logits(cfg, params, batch)
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  merged = lora.merge_lora(params, cfg)
  assert jax.tree.structure(merged) == jax.tree.structure(init(base_cfg))
  np.testing.assert_allclose(logits(base_cfg, merged, batch), adapted, rtol=1e-4, atol=1e-4)
  # The adapters matter: the base weights alone give other logits.
  assert float(jnp.max(jnp.abs(logits(base_cfg, lora.partition(params)[1], batch) - adapted))) > 1e-2


def test_only_the_targeted_projections_get_adapters_with_their_weights_logical_axes():
  cfg = dataclasses.replace(BASE, lora_rank=4, lora_targets=("wq", "wo", "w_down"))
  boxed = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  attn, mlp = boxed["layer_0"]["attn"], boxed["layer_0"]["mlp"]
  assert {k for k in attn if "lora" in k} == {"wq_lora_a", "wq_lora_b", "wo_lora_a", "wo_lora_b"}
  assert {k for k in mlp if "lora" in k} == {"w_down_lora_a", "w_down_lora_b"}
  assert attn["wq_lora_a"].names == ("embed", None) and attn["wq_lora_b"].names == (None, "heads", "head_dim")
  assert attn["wo_lora_a"].names == ("heads", "head_dim", None) and attn["wo_lora_b"].names == (None, "embed")
  assert mlp["w_down_lora_a"].names == ("mlp", None) and mlp["w_down_lora_b"].names == (None, "embed")
  assert attn["wq_lora_b"].unbox().shape == (4, 4, 8) and not np.any(attn["wq_lora_b"].unbox())
  # The rules table shards an adapter as it shards its weight: B's heads over `tensor`, A's rows over `fsdp`.
  specs = nn.logical_to_mesh_axes(attn["wq_lora_b"].names, partitioning.RULES)
  assert tuple(specs) == (None, "tensor", None)
  assert tuple(nn.logical_to_mesh_axes(attn["wq_lora_a"].names, partitioning.RULES)) == ("fsdp", None)


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_the_mask_and_partition_select_the_adapters_and_the_counts_match(head):
  cfg = dataclasses.replace(BASE, lora_rank=4, head=head)
  params = init(cfg)
  mask = lora.lora_mask(params)
  masked = {"/".join(p.key for p in path) for path, keep in jax.tree_util.tree_flatten_with_path(mask)[0] if keep}
  trainable, frozen = lora.partition(params)
  assert masked == adapter_names(trainable)
  assert all(name.endswith(("_lora_a", "_lora_b")) for name in masked - {"score"})
  assert ("score" in masked) == (head == "scalar")  # a reward model's new head trains with the adapters
  assert not any("lora" in name for name in adapter_names(frozen))
  assert len(masked) == 2 * 7 * 2 + (head == "scalar")  # A and B of 7 projections in 2 layers
  jax.tree.map(np.testing.assert_array_equal, lora.combine(trainable, frozen), params)
  total = sum(x.size for x in jax.tree.leaves(params))
  assert flops.param_counts(cfg)["total"] == total
  assert flops.trainable_params(cfg) == sum(x.size for x in jax.tree.leaves(trainable))
  assert flops.lora_params(cfg) == sum(x.size for x in jax.tree.leaves(trainable)) - (
    cfg.d_model if head == "scalar" else 0
  )
  assert flops.trainable_params(BASE) == flops.param_counts(BASE)["total"]


def test_the_optimizer_recipe_keeps_state_for_adapters_only_and_never_moves_the_base():
  cfg = dataclasses.replace(BASE, lora_rank=4)
  params = init(cfg)
  tx = optax.multi_transform({True: optax.adamw(1e-2), False: optax.set_to_zero()}, lora.lora_mask(params))
  state = tx.init(params)
  moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert moments == 2 * flops.trainable_params(cfg)  # Adam's mu and nu, for the adapters only
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  trainable, frozen = lora.partition(new)
  jax.tree.map(np.testing.assert_array_equal, frozen, lora.partition(params)[1])
  assert all(
    np.any(a != b) for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(lora.partition(params)[0]), strict=True)
  )


def test_a_gradient_of_the_trainable_tree_alone_has_b_moving_first():
  cfg = dataclasses.replace(BASE, lora_rank=4)
  trainable, frozen = lora.partition(init(cfg))
  batch = random_batch(2, 16, V)

  def loss(trainable):
    x, head = Transformer(cfg).apply(
      {"params": lora.combine(trainable, frozen)},
      batch["inputs"],
      batch["segment_ids"],
      batch["positions"],
      return_hidden=True,
    )
    return head_loss(x, head, batch["targets"], batch["loss_mask"], 0.0, "float32")[0]

  grads = jax.grad(loss)(trainable)
  flat = {name: g for name, g in zip(sorted(adapter_names(grads)), jax.tree.leaves(grads), strict=True)}
  # With B = 0 the loss does not depend on A to first order (d/dA = x^T dy B^T = 0), and B gets all the gradient.
  assert all(not np.any(g) for name, g in flat.items() if name.endswith("_lora_a"))
  assert all(np.any(g) for name, g in flat.items() if name.endswith("_lora_b"))


@pytest.mark.parametrize(
  "cfg, length",
  [
    (ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=256, lora_rank=8), 512),
    (
      ModelConfig(
        vocab_size=512,
        d_model=128,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        d_ff=384,
        lora_rank=4,
        lora_targets=("wq", "wv"),
      ),
      384,
    ),
  ],
)
def test_computed_flops_of_an_adapters_only_gradient_match_xla(cfg, length):
  b = 2
  params = init(cfg)
  data = random_batch(b, length, cfg.vocab_size)
  trainable, frozen = lora.partition(params)

  def loss(trainable):
    x, head = Transformer(cfg).apply(
      {"params": lora.combine(trainable, frozen)},
      data["inputs"],
      data["segment_ids"],
      data["positions"],
      return_hidden=True,
    )
    return head_loss(x, head, data["targets"], data["loss_mask"], 0.0, cfg.dtype)[0]

  analysis = jax.jit(jax.grad(loss)).lower(trainable).compile().cost_analysis()
  measured = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
  computed = flops.flops_per_token_computed(cfg, length) * b * length
  assert abs(computed / measured - 1) < 0.05, (computed, measured)
  # Counting every weight's gradient, as a full fine-tune computes, would be far off.
  every_weight = flops.flops_per_token_computed(dataclasses.replace(cfg, lora_rank=0), length) + 6 * flops.lora_params(
    cfg
  )
  assert every_weight * b * length / measured > 1.3


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="lm plan compiles with libtpu")
def test_plan_compiles_a_lora_model_for_a_slice_and_reports_its_trained_parameters_and_their_optimizer_state():
  cfg = tiny_config(**{"mesh.fsdp": -1})
  cfg.model.lora_rank = 4
  report = plan.Planner("v5e:2x4").plan(cfg)
  model_cfg = ModelConfig.from_config(cfg, accounting.vocab_size(cfg))
  assert model_cfg.lora_rank == 4 and report["fits"]
  assert report["params"]["total"] == flops.param_counts(model_cfg)["total"]
  # R (in + out) per projection and layer: wq and wo 32 + 32, wk and wv 32 + 16, the MLP's three 32 + 64.
  assert report["trainable_params"] == flops.lora_params(model_cfg) == 2 * 4 * (2 * 64 + 2 * 48 + 3 * 96)
  assert f"{report['trainable_params'] / 1e3:.1f}K trained" in plan.format_report(report)
  # Adam's two moments of the adapters' shards, and its step counts: no optimizer state for the base weights.
  mesh = partitioning.make_mesh(cfg, devices=plan.topology_devices("v5e:2x4"))
  params = state.build(cfg, accounting.vocab_size(cfg), mesh).abstract_state.params
  trained_bytes, all_bytes = (
    sum(plan.shard_bytes(x) for x in jax.tree.leaves(t)) for t in (lora.partition(params)[0], params)
  )
  memory = report["memory_per_device"]
  assert 2 * trained_bytes <= memory["optimizer"] <= 2 * trained_bytes + 64
  assert memory["params"] == all_bytes  # the base weights are on the devices, though


def test_an_adapted_model_decodes_with_the_kv_cache():
  cfg = dataclasses.replace(BASE, lora_rank=4)
  model, params = Transformer(cfg), perturbed(init(cfg))
  tokens = np.random.default_rng(0).integers(0, V, (2, 12)).astype(np.int32)
  full = model.apply({"params": params}, tokens)
  step = jax.jit(lambda params, x, pos, cache: model.apply({"params": params}, x, None, pos, cache=cache))
  logits, cache = step(params, tokens[:, :6], np.broadcast_to(np.arange(6), (2, 6)), init_cache(cfg, 2, 12))
  np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
  for t in range(6, 12):
    logits, cache = step(params, tokens[:, t : t + 1], np.full((2, 1), t), cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
