import numpy as np
import pytest

from conftest import run_devices_script

# Runs in a fresh process with 8 simulated CPU devices: 5 train steps per mesh layout.
SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from conftest import tiny_config, random_batch
from lm import partitioning
from lm import state as state_lib
from lm import step as step_lib

def losses(mesh_shape, n_devices, **overrides):
  cfg = tiny_config(**{"mesh.data": mesh_shape[0], "mesh.fsdp": mesh_shape[1], "mesh.tensor": mesh_shape[2],
                       "model.d_model": 64, "model.d_ff": 128, **overrides})
  mesh = partitioning.make_mesh(cfg, jax.devices()[:n_devices])
  setup = state_lib.build(cfg, 128, mesh)
  step = step_lib.make_train_step(setup)
  out, specs = [], {}
  with setup.context():
    state = setup.init_state()
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    wq = next(x for path, x in flat if "wq" in jax.tree_util.keystr(path))
    specs = {"wq": str(wq.sharding.spec), "embed": str(state.params["embed"].sharding.spec)}
    experts = [x for path, x in flat if jax.tree_util.keystr(path).endswith("['moe']['w_gate']")]
    if experts:
      specs["experts"] = str(experts[0].sharding.spec)
    for i in range(5):
      batch = jax.device_put(random_batch(8, 32, 128, seed=i, split=12), partitioning.batch_sharding(mesh))
      state, metrics = step(state, batch)
      out.append(float(metrics["train/loss"]))
  return {"losses": out, "specs": specs}

layouts = {"single": ((1, 1, 1), 1), "data": ((8, 1, 1), 8), "fsdp": ((1, 8, 1), 8),
           "tensor": ((1, 1, 4), 4), "mixed": ((2, 2, 2), 8)}
result = {name: losses(shape, n) for name, (shape, n) in layouts.items()}
variant = {"model.n_kv_heads": 1, "model.tie_embeddings": True, "model.scan_layers": True, "model.remat": "full"}
result["variant_single"] = losses((1, 1, 1), 1, **variant)
result["variant_mixed"] = losses((2, 2, 2), 8, **variant)
moe = {"model.moe.experts": 4, "model.moe.d_ff": 32, "model.moe.shared_experts": 1, "model.scan_layers": True,
       "model.remat": "full"}
result["moe_single"] = losses((1, 1, 1), 1, **moe)
result["moe_expert_parallel"] = losses((2, 2, 1), 8, **moe, **{"mesh.expert": 2})
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def results():
  return run_devices_script(SCRIPT, devices=8)


@pytest.mark.parametrize("layout", ["data", "fsdp", "tensor", "mixed"])
def test_every_mesh_layout_gives_the_single_device_losses(results, layout):
  np.testing.assert_allclose(results[layout]["losses"], results["single"]["losses"], rtol=1e-5)


def test_mqa_tied_scanned_rematted_model_shards_equivalently(results):
  np.testing.assert_allclose(results["variant_mixed"]["losses"], results["variant_single"]["losses"], rtol=1e-5)


def test_expert_parallel_moe_gives_the_single_device_losses(results):
  # expert 2 x data 2 x fsdp 2: experts split over `expert`, their d_model over `fsdp`; scanned, rematted layers.
  assert "expert" in results["moe_expert_parallel"]["specs"]["experts"]
  assert "fsdp" in results["moe_expert_parallel"]["specs"]["experts"]
  np.testing.assert_allclose(results["moe_expert_parallel"]["losses"], results["moe_single"]["losses"], rtol=1e-5)


def test_parameters_are_actually_sharded(results):
  assert "fsdp" in results["fsdp"]["specs"]["wq"]
  assert "tensor" in results["tensor"]["specs"]["wq"]
  assert "fsdp" in results["mixed"]["specs"]["embed"] and "tensor" in results["mixed"]["specs"]["embed"]


def test_losses_decrease(results):
  assert results["single"]["losses"][-1] < results["single"]["losses"][0]
