"""Mixture of experts: routing by hand, the layer against the dense MLP, the loss, a run's metrics."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from resume_test import ON_8_DEVICES, layout_change_config, shard_shapes, train_on_mesh

from lm import flops, train
from lm.model import ModelConfig, MoEConfig, Transformer, init_cache, moe_stats, route
from lm.objectives.lm import NextToken
from lm.scaling import accounting

from conftest import random_batch, run_devices_script, tiny_config

V = 97


def make(moe: MoEConfig, **kw):
  cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, moe=moe, **kw)
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  return model, jax.tree.map(
    lambda x: x.unbox() if hasattr(x, "unbox") else x, params, is_leaf=lambda x: hasattr(x, "unbox")
  )


def logits_of(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))[None]


def test_capacity_drops_second_choices_first_as_computed_by_hand():
  # 3 tokens, 3 experts, top-2, 1 slot per expert. First choices fill slots before second choices:
  #   first choices:  t0 -> e0 (slot 0, kept), t1 -> e0 (full: dropped), t2 -> e1 (kept)
  #   second choices: t0 -> e1 (full: dropped), t1 -> e2 (kept), t2 -> e0 (full: dropped)
  probs = [[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.3, 0.6, 0.1]]
  dispatch, combine, stats = route(logits_of(probs), top_k=2, capacity=1, renormalize=True)
  assert dispatch.shape == (1, 3, 3, 1)
  np.testing.assert_array_equal(dispatch[0, :, :, 0], [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
  # Kept weights are the top-2 probabilities renormalised over the two chosen experts.
  np.testing.assert_allclose(combine[0, :, :, 0], [[0.6 / 0.9, 0, 0], [0, 0, 0.4 / 0.9], [0, 0.6 / 0.9, 0]], rtol=1e-6)
  assert float(stats["dropped"]) == 0.5
  np.testing.assert_allclose(stats["load"], [3 / 6, 2 / 6, 1 / 6])  # choices per expert, before dropping
  # Without renormalisation the weights are the softmax probabilities themselves.
  _, raw, _ = route(logits_of(probs), top_k=2, capacity=1, renormalize=False)
  np.testing.assert_allclose(raw[0, 0, 0, 0], 0.6, rtol=1e-6)


def test_overflow_of_one_expert_keeps_tokens_in_order():
  # 4 tokens all prefer expert 0, capacity 2, top-1: tokens 0 and 1 take slots 0 and 1, tokens 2 and 3 drop.
  dispatch, _, stats = route(logits_of([[0.9, 0.1]] * 4), top_k=1, capacity=2, renormalize=True)
  np.testing.assert_array_equal(dispatch[0, :, 0, :], [[1, 0], [0, 1], [0, 0], [0, 0]])
  assert float(jnp.sum(dispatch[0, :, 1])) == 0
  assert float(stats["dropped"]) == 0.5


def test_auxiliary_losses_and_entropy_against_closed_forms():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32)
  _, _, stats = route(logits, top_k=2, capacity=8, renormalize=True)
  probs = jax.nn.softmax(logits, -1)
  chosen = jax.nn.one_hot(jax.lax.top_k(probs, 2)[1], 4).sum(2)  # [G, S, X]
  load = chosen.mean((0, 1)) / 2
  np.testing.assert_allclose(stats["load"], load, rtol=1e-6)
  np.testing.assert_allclose(stats["aux_loss"], 4 * jnp.sum(load * probs.mean((0, 1))), rtol=1e-6)
  np.testing.assert_allclose(stats["z_loss"], jnp.mean(jax.nn.logsumexp(logits, -1) ** 2), rtol=1e-6)
  np.testing.assert_allclose(stats["entropy"], jnp.mean(-jnp.sum(probs * jnp.log(probs), -1)), rtol=1e-5)
  assert float(stats["dropped"]) == 0.0  # capacity = S: dropless
  # Tokens spread over the experts give about 1; all on one confident expert give about X = 4.
  balanced = route(10.0 * jnp.eye(4)[None], top_k=1, capacity=4, renormalize=True)[2]["aux_loss"]
  collapsed = route(10.0 * jnp.eye(4)[None, [0, 0, 0, 0]], top_k=1, capacity=4, renormalize=True)[2]["aux_loss"]
  assert float(balanced) == pytest.approx(1.0, abs=1e-3) and float(collapsed) == pytest.approx(4.0, abs=1e-3)
  _, _, uniform = route(jnp.zeros((1, 8, 4)), top_k=1, capacity=8, renormalize=True)
  assert float(uniform["entropy"]) == pytest.approx(np.log(4), rel=1e-6)


def test_one_expert_with_top_1_is_the_dense_mlp_exactly():
  dense, dense_params = make(MoEConfig())
  moe, moe_params = make(MoEConfig(experts=1, top_k=1, capacity_factor=0.0))
  params = jax.tree.map(lambda x: x, dense_params)
  for i in range(2):
    expert = moe_params[f"layer_{i}"]["moe"]
    params[f"layer_{i}"] = {k: v for k, v in dense_params[f"layer_{i}"].items() if k != "mlp"}
    params[f"layer_{i}"]["moe"] = {"router": expert["router"]}
    params[f"layer_{i}"]["moe"].update(
      {k: dense_params[f"layer_{i}"]["mlp"][k][None] for k in ("w_gate", "w_up", "w_down")}
    )
  batch = random_batch(2, 16, V, split=5)
  args = (batch["inputs"], batch["segment_ids"], batch["positions"])
  want = dense.apply({"params": dense_params}, *args)
  got = moe.apply({"params": params}, *args)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_shared_experts_and_every_nth_layer_shape_the_params():
  _, params = make(MoEConfig(experts=4, top_k=2, every=2, shared_experts=1, d_ff=16))
  assert "mlp" in params["layer_0"] and "moe" not in params["layer_0"]
  layer = params["layer_1"]["moe"]
  assert layer["w_gate"].shape == (4, 32, 16) and layer["w_down"].shape == (4, 16, 32)
  assert layer["router"].shape == (32, 4) and layer["shared"]["w_up"].shape == (32, 16)
  cfg = ModelConfig(
    vocab_size=V,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    moe=MoEConfig(experts=4, top_k=2, every=2, shared_experts=1, d_ff=16),
  )
  assert flops.param_counts(cfg)["total"] == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("scan", [False, True])
def test_dropless_cached_decoding_matches_the_full_forward_pass(scan):
  model, params = make(MoEConfig(experts=4, top_k=2, capacity_factor=0.0), scan_layers=scan)
  tokens = np.random.default_rng(0).integers(0, V, (2, 12)).astype(np.int32)
  full = model.apply({"params": params}, tokens)
  step = jax.jit(lambda params, x, pos, cache: model.apply({"params": params}, x, None, pos, cache=cache))
  logits, cache = step(params, tokens[:, :5], np.tile(np.arange(5), (2, 1)), init_cache(model.cfg, 2, 16))
  np.testing.assert_allclose(logits, full[:, :5], atol=1e-5)
  for t in range(5, 12):
    logits, cache = step(params, tokens[:, t : t + 1], np.full((2, 1), t), cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_the_loss_adds_the_weighted_auxiliary_losses():
  cfg = tiny_config(**{"model.moe.experts": 4, "model.moe.aux_loss": 0.5, "model.moe.z_loss": 0.25})
  model, params = make(MoEConfig(experts=4, top_k=2))
  batch = random_batch(4, 16, V)
  batch["loss_mask"][:, :3] = 0
  loss_sum, tokens, sums = NextToken(cfg).make_loss(model)(params, batch, jax.random.key(0), {})
  assert float(tokens) == 4 * 13
  _, sown = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"], mutable=["moe"])
  stats = moe_stats(sown["moe"])
  want = float(sums["loss"]) + 52 * (0.5 * float(stats["aux_loss"]) + 0.25 * float(stats["z_loss"]))
  assert float(loss_sum) == pytest.approx(want, rel=1e-6)
  assert float(sums["moe/aux_loss"]) == pytest.approx(52 * float(stats["aux_loss"]), rel=1e-6)
  assert sum(float(sums[f"moe/load_{i}"]) for i in range(4)) == pytest.approx(52, rel=1e-6)


def test_an_moe_run_logs_routing_and_counts_active_flops(tmp_path):
  overrides = {"model.moe.experts": 4, "model.moe.top_k": 2, "model.moe.d_ff": 32, "train.steps": 4}
  cfg = tiny_config(**overrides)
  train.train(cfg, str(tmp_path / "run"), progress=False)
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in rows if "train/moe/aux_loss" in r]
  assert len(logged) == 4
  for r in logged:
    assert sum(r[f"train/moe/load_{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= r["train/moe/dropped"] < 0.5 and 0.0 < r["train/moe/entropy"] <= np.log(4) + 1e-6
    assert r["train/moe/aux_loss"] >= 1.0 - 1e-5 and r["train/moe/z_loss"] > 0
  acc = accounting.accounting(cfg)
  assert acc["params"]["active"] < acc["params"]["total"]
  per_token = acc["flops_per_token"][cfg.train.flops_convention]
  assert logged[-1]["flops"] == pytest.approx(per_token * 4 * cfg.train.batch_size * cfg.data.seq_len)


def test_impossible_moe_configs_are_one_line_errors():
  from lm import config as config_lib
  from lm.errors import UserError

  for overrides, message in (
    ({"model.moe.experts": 4, "model.moe.top_k": 5}, "model.moe.top_k"),
    ({"model.moe.experts": 4, "model.moe.every": 2, "model.scan_layers": True}, "model.moe.every=1"),
    ({"model.moe.experts": 4, "model.moe.group_size": 5}, "model.moe.group_size"),
    ({"model.moe.experts": 4, "model.lora_rank": 4}, "LoRA on an MoE model"),
  ):
    with pytest.raises(UserError, match=message):
      config_lib.validate(tiny_config(**overrides))
  with pytest.raises(UserError, match="divisible by mesh.expert"):
    config_lib.validate(tiny_config(**{"model.moe.experts": 3, "mesh.expert": 2, "mesh.data": 1}), num_devices=2)
  assert dataclasses.asdict(ModelConfig.from_config(tiny_config(**{"model.moe.experts": 4}), V).moe)["experts"] == 4


def test_checkpoints_restore_across_expert_parallel_layouts(tmp_path):
  common = {
    **layout_change_config(tmp_path),
    "model.moe.experts": 4,
    "model.moe.d_ff": 32,
  }
  first, second = str(tmp_path / "expert4_data2"), str(tmp_path / "expert2_fsdp2_tensor2")
  runs = [
    {"config": {**common, "train.steps": 4, "mesh.data": 2, "mesh.expert": 4}, "workdir": first, "sharded": "w_gate"},
    {
      "config": {**common, "train.steps": 6, "mesh.data": 1, "mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
      "workdir": second,
      "copy_from": first,
      "sharded": "w_gate",
    },
  ]
  first, second = run_devices_script(ON_8_DEVICES.format(runs=json.dumps(runs)), devices=8)
  single = train_on_mesh(
    {**common, "train.steps": 6}, str(tmp_path / "single"), str(tmp_path / "expert4_data2"), "w_gate"
  )

  # Every leaf comes back bit for bit, the experts laid out for each mesh: [experts, d_model, expert d_ff].
  assert first["final"]["step"] == 4
  assert second["restored"]["hashes"] == first["final"]["hashes"] == single["restored"]["hashes"]
  assert shard_shapes(first["final"]) == {(1, 32, 32)}  # 4 experts over expert=4
  assert shard_shapes(second["restored"]) == {(2, 16, 16)}  # over expert=2, fsdp=2 (d_model), tensor=2 (d_ff)
  assert shard_shapes(single["restored"]) == {(4, 32, 32)}
  for s in ("5", "6"):
    assert second["losses"][s] == pytest.approx(single["losses"][s], rel=1e-4)
