import ml_collections
import pytest

from lm import config as config_lib
from lm.errors import UserError

from conftest import tiny_config


def write_experiment(tmp_path, body: str) -> str:
  path = tmp_path / "exp.py"
  path.write_text(body)
  return str(path)


def test_load_config_applies_typed_overrides(tmp_path):
  path = write_experiment(
    tmp_path,
    "from lm.config import default_config\n"
    "def get_config():\n  c = default_config()\n  c.model.d_model = 64\n  return c\n",
  )
  cfg = config_lib.load_config(
    path, ["model.n_layers=3", "optim.lr=1e-3", "model.tie_embeddings=true", "data.source=x"]
  )
  assert cfg.model.d_model == 64
  assert cfg.model.n_layers == 3 and isinstance(cfg.model.n_layers, int)
  assert cfg.optim.lr == pytest.approx(1e-3)
  assert cfg.model.tie_embeddings is True
  assert cfg.data.source == "x"


def test_partial_config_is_merged_into_defaults(tmp_path):
  path = write_experiment(
    tmp_path, "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'train': {'steps': 7}})\n"
  )
  cfg = config_lib.load_config(path)
  assert cfg.train.steps == 7
  assert cfg.model.d_model == config_lib.default_config().model.d_model


@pytest.mark.parametrize(
  "override, message",
  [
    ("model.nope=1", "unknown config key: model.nope"),
    ("nope.d_model=1", "unknown config key: nope.d_model"),
    ("model.d_model=big", "model.d_model must be int"),
    ("optim.lr=fast", "optim.lr must be float"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings must be bool"),
    ("model.d_model", "override must be KEY=VALUE"),
  ],
)
def test_bad_overrides_name_the_key(override, message):
  with pytest.raises(UserError, match=message):
    config_lib.apply_override(config_lib.default_config(), override)


def test_wrong_type_in_experiment_file(tmp_path):
  path = write_experiment(
    tmp_path,
    "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'train': {'steps': 'ten'}})\n",
  )
  with pytest.raises(UserError, match="train.steps must be int"):
    config_lib.load_config(path)


@pytest.mark.parametrize(
  "body, message",
  [
    ("def get_config():\n  raise ValueError('boom')\n", "get_config\\(\\) raised ValueError: boom"),
    ("import nonexistent_module_xyz\n", "importing it raised ModuleNotFoundError"),
    ("x = 1\n", "defines no get_config"),
    ("def get_config():\n  return {}\n", "must return an ml_collections.ConfigDict"),
  ],
)
def test_broken_experiment_files(tmp_path, body, message):
  with pytest.raises(UserError, match=message):
    config_lib.load_config(write_experiment(tmp_path, body))


def test_missing_config_file(tmp_path):
  with pytest.raises(UserError, match="config file not found"):
    config_lib.load_config(str(tmp_path / "missing.py"))


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"model.d_model": 30}, "model.d_model \\(30\\) must be divisible by model.n_heads"),
    ({"model.n_kv_heads": 3}, "model.n_heads \\(4\\) must be a multiple of model.n_kv_heads"),
    ({"optim.lr": 0.0}, "optim.lr must be positive"),
    ({"optim.lr": -1.0}, "optim.lr must be positive"),
    ({"train.steps": 0}, "train.steps must be positive"),
    ({"train.batch_size": -4}, "train.batch_size must be positive"),
    ({"data.seq_len": 1}, "data.seq_len must be at least 2"),
    ({"data.eval_fraction": 1.5}, "data.eval_fraction"),
    ({"tokenizer.kind": "wordpiece"}, "tokenizer.kind"),
    ({"optim.schedule": "linear"}, "optim.schedule"),
    ({"model.dtype": "float16"}, "model.dtype"),
    ({"optim.grad_accum_steps": 3}, "must be divisible by optim.grad_accum_steps"),
    ({"train.objective": "ppo2"}, "^train.objective must be one of \\('lm',.*\\), got 'ppo2'$"),
  ],
)
def test_validation_names_the_key(overrides, message):
  with pytest.raises(UserError, match=message):
    config_lib.validate(tiny_config(**overrides))


def test_init_from_names_a_run_or_a_checkpoint_of_one():
  assert config_lib.init_from(tiny_config(**{"train.init_from": "runs/base/"})) == ("runs/base", None)
  branch = tiny_config(**{"train.init_from": "runs/long/checkpoints/30"})
  assert config_lib.init_from(branch) == ("runs/long", 30)
  config_lib.validate(branch)


def test_batch_must_divide_over_data_parallel_devices():
  cfg = tiny_config(**{"train.batch_size": 12, "mesh.data": -1})
  config_lib.validate(cfg, num_devices=4)  # 12 rows over 4 devices: fine
  with pytest.raises(UserError, match="data-parallel devices"):
    config_lib.validate(cfg, num_devices=8)


def test_mesh_shape_resolves_minus_one():
  cfg = tiny_config(**{"mesh.data": -1, "mesh.fsdp": 2, "mesh.tensor": 2})
  assert config_lib.mesh_shape(cfg, 8) == (2, 1, 2, 2)
  with pytest.raises(UserError, match="do not divide"):
    config_lib.mesh_shape(cfg, 6)
  cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
  with pytest.raises(UserError, match="needs 4 devices, but 8 are present"):
    config_lib.mesh_shape(cfg, 8)


def test_json_round_trip_and_resume_compatibility():
  cfg = tiny_config()
  again = config_lib.from_json(config_lib.to_json(cfg))
  assert again.to_dict() == cfg.to_dict()
  longer = ml_collections.ConfigDict(cfg.to_dict())
  longer.train.steps = 1000
  longer.train.log_every = 3
  assert config_lib.incompatible_changes(cfg, longer) == []
  wider = ml_collections.ConfigDict(cfg.to_dict())
  wider.model.d_model = 64
  wider.optim.lr = 1.0
  assert config_lib.incompatible_changes(cfg, wider) == ["model.d_model: 32 -> 64", "optim.lr: 0.003 -> 1.0"]
