"""lm import hf / lm export hf against transformers' own Llama (test extras: transformers and torch, CPU).

Every model here is built locally: a randomly initialised transformers Llama with a byte-level BPE tokenizer
trained on a few standard-library files, and a tiny lm run. Nothing is downloaded.
"""

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lm import hf, train  # noqa: E402
from lm import model as model_lib  # noqa: E402
from lm import workdir as workdir_lib  # noqa: E402
from lm.errors import UserError  # noqa: E402

from conftest import run_devices_script, run_lm, tiny_config, write_conversations  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
TEXTS = ["def f(x):\n    return x + 1\n", "import json", "Hello, world: caf\u00e9 \u4e2d\u6587 \U0001f600!"]


def stdlib_text(n_files: int = 12) -> list[str]:
  files = sorted(glob.glob(os.path.join(os.path.dirname(json.__file__), "*.py")))
  files += sorted(glob.glob(os.path.join(os.path.dirname(subprocess.__file__), "email", "*.py")))
  return [open(f, encoding="utf-8").read() for f in files[:n_files]]


def make_hf_llama(path, tied: bool, **config) -> None:
  """A random transformers Llama (GQA: 4 query heads, 2 kv heads) and a byte-level BPE tokenizer in `path`."""
  from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  tk.train_from_iterator(
    stdlib_text(),
    trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet),
  )
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(str(path))
  settings = dict(
    vocab_size=416,  # more rows than tokens, as many checkpoints have
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=50_000.0,
    tie_word_embeddings=tied,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # large enough that greedy decoding does not repeat one token
  )
  torch.manual_seed(0)
  if config.pop("model_type", "llama") == "mistral":
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**{**settings, **config}, sliding_window=None))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # not ones: a transposed or misplaced norm would show
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(str(path))


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_untied")
  make_hf_llama(path, tied=False)
  return path


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_tied")
  make_hf_llama(path, tied=True)
  return path


@pytest.fixture(scope="module", params=["untied", "tied", "mistral", "smollm_like"])
def hf_llama(request, tmp_path_factory):
  if request.param in ("untied", "tied"):
    return request.getfixturevalue(f"{request.param}_llama")
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  if request.param == "mistral":
    make_hf_llama(path, tied=False, model_type="mistral")
  else:  # SmolLM's proportions: 3 query heads per kv head, tied, a wide MLP
    make_hf_llama(path, tied=True, hidden_size=72, num_attention_heads=6, num_key_value_heads=2, intermediate_size=192)
  return path


lm_cli = run_lm


@pytest.fixture(scope="module")
def imported(hf_llama, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("imported") / "run"
  out = lm_cli("import", "hf", "--from", str(hf_llama), "--workdir", str(workdir))
  assert "appended <|system|>, <|user|>, <|assistant|>, <|end|>, <|tool|>" in out.stdout
  return workdir


def padded(tok, texts: list[str]) -> dict:
  """Left-padded rows of bos + text: padding has segment id 0, each row's positions start at its bos."""
  ids = [[tok.bos_id] + x for x in tok.encode(texts)]
  t = max(map(len, ids))
  batch = {k: np.zeros((len(ids), t), np.int32) for k in ("inputs", "segment_ids", "positions")}
  for i, x in enumerate(ids):
    batch["inputs"][i, t - len(x) :] = x
    batch["segment_ids"][i, t - len(x) :] = 1
    batch["positions"][i, t - len(x) :] = np.arange(len(x))
  return batch


def hf_logits(model, batch: dict) -> np.ndarray:
  with torch.no_grad():
    return model(
      input_ids=torch.tensor(batch["inputs"], dtype=torch.long),
      attention_mask=torch.tensor(batch["segment_ids"]),
      position_ids=torch.tensor(batch["positions"], dtype=torch.long),
    ).logits.numpy()


def load_hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")


def test_an_imported_llama_computes_the_logits_transformers_does(hf_llama, imported):
  cfg, tok, setup, params = workdir_lib.load_params(str(imported))
  reference = load_hf(hf_llama).eval()
  vocab = reference.config.vocab_size
  assert tok.kind == "huggingface" and tok.bos_id == 1 and tok.eos_id == 2 and tok.vocab_size == vocab + 5
  assert cfg.model.n_kv_heads == 2 and cfg.model.tie_embeddings == reference.config.tie_word_embeddings
  assert cfg.model.n_heads == reference.config.num_attention_heads
  batch = padded(tok, TEXTS)
  logits = np.asarray(model_lib.forward(setup.model, params, batch))
  real = batch["segment_ids"].astype(bool)
  theirs = hf_logits(reference, batch)
  gap = np.abs(logits[..., :vocab] - theirs)[real].max()
  print(f"imported {reference.config.model_type}: max |logit difference| {gap:.2e}")
  np.testing.assert_allclose(logits[..., :vocab][real], theirs[real], atol=1e-4, rtol=0)
  # The appended chat tokens start as the mean row: their logit is the mean logit, never the largest.
  assert np.allclose(logits[..., vocab:][real], logits[..., :vocab][real].mean(-1, keepdims=True), atol=1e-4)
  # Its tokenizer is the checkpoint's: the same ids as transformers' for any text, specials read as text.
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_llama))
  for text in [*TEXTS, "<s> and </s> are text here"]:
    assert tok.encode([text])[0] == hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok.decode(tok.encode([text])[0]) == text


def test_greedy_generation_matches_transformers_generate(hf_llama, imported):
  _, tok, _, _ = workdir_lib.load_params(str(imported))
  reference = load_hf(hf_llama).eval()
  out = lm_cli(
    "sample", "--workdir", str(imported), "--prompt", TEXTS[0], "--temperature", "0", "--max-new-tokens", "24", "--json"
  )
  ours = [t["id"] for t in json.loads(out.stdout)["samples"][0]["tokens"]]
  prompt = torch.tensor([[tok.bos_id] + tok.encode([TEXTS[0]])[0]])
  with torch.no_grad():
    theirs = reference.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_id)[
      0, prompt.shape[1] :
    ]
  theirs = theirs.tolist()
  theirs = theirs[: theirs.index(tok.eos_id)] if tok.eos_id in theirs else theirs
  assert len(set(ours)) > 3  # not one token over and over
  assert ours == theirs


def train_run(root, kind: str):
  """A tiny trained lm run (untied for bytes, tied for sentencepiece) on Python-like text."""
  (root / "corpus.txt").write_text(
    "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # caf\u00e9\n\n" for i in range(2000))
  )
  overrides = {
    "data.source": f"text:{root / 'corpus.txt'}",
    "tokenizer.kind": kind,
    "train.steps": 20,
    "data.seq_len": 64,
  }
  if kind == "sentencepiece":
    overrides |= {"tokenizer.vocab_size": 300, "model.tie_embeddings": True}
  train.train(tiny_config(**overrides), str(root / "run"), progress=False)
  return root / "run"


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
  return train_run(tmp_path_factory.mktemp("lm_byte"), "byte")


@pytest.fixture(scope="module")
def sentencepiece_run(tmp_path_factory):
  return train_run(tmp_path_factory.mktemp("lm_sentencepiece"), "sentencepiece")


@pytest.fixture(scope="module", params=["byte", "sentencepiece"])
def lm_run(request):
  return request.getfixturevalue(f"{request.param}_run")


@pytest.fixture(scope="module")
def exported(lm_run):
  out = lm_run.parent / "hf"
  lm_cli("export", "hf", "--workdir", str(lm_run), "--out", str(out))
  return out


def test_an_exported_run_computes_its_logits_under_transformers(lm_run, exported):
  _, tok, setup, params = workdir_lib.load_params(str(lm_run))
  reference = load_hf(exported).eval()
  assert reference.config.tie_word_embeddings == setup.model_cfg.tie_embeddings
  assert sorted(os.listdir(exported)) == sorted(
    ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    + [f for f in os.listdir(exported) if f == "special_tokens_map.json"]
  )
  batch = padded(tok, ["def f1(x):", "    return x * 3", "x"])
  real = batch["segment_ids"].astype(bool)
  logits = np.asarray(model_lib.forward(setup.model, params, batch))
  theirs = hf_logits(reference, batch)
  print(f"exported {tok.kind} run: max |logit difference| {np.abs(logits - theirs)[real].max():.2e}")
  np.testing.assert_allclose(logits[real], theirs[real], atol=1e-4, rtol=0)
  # Its tokenizer loads with AutoTokenizer and gives lm's ids, chat template included.
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported))
  text = "def f7(x):\n    return x * 7 + 0  # caf\u00e9 \u4e2d\n"
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode([text])[0]
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f2(x):"}]
  from lm import chat  # noqa: PLC0415

  rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
  assert rendered["input_ids"] == chat.render(tok, messages, generation_prompt=True)[0]


def test_greedy_generation_of_an_exported_run_matches(lm_run, exported):
  _, tok, _, _ = workdir_lib.load_params(str(lm_run))
  reference = load_hf(exported).eval()
  out = lm_cli(
    "sample",
    "--workdir",
    str(lm_run),
    "--prompt",
    "def f12(x):\n",
    "--temperature",
    "0",
    "--max-new-tokens",
    "20",
    "--json",
  )
  ours = [t["id"] for t in json.loads(out.stdout)["samples"][0]["tokens"]]
  prompt = torch.tensor([[tok.bos_id] + tok.encode(["def f12(x):\n"])[0]])
  with torch.no_grad():
    theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False)[0, prompt.shape[1] :].tolist()
  stops = {tok.eos_id, tok.special["<|end|>"]}  # generation_config.json's eos_token_id list
  cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
  assert len(ours) >= 5 and ours == theirs[:cut]


def test_export_then_import_gives_back_the_same_params_bit_for_bit(lm_run, exported, tmp_path):
  cfg, tok, _, params = workdir_lib.load_params(str(lm_run))
  lm_cli("import", "hf", "--from", str(exported), "--workdir", str(tmp_path / "back"), f"--seq-len={cfg.data.seq_len}")
  back_cfg, back_tok, _, back_params = workdir_lib.load_params(str(tmp_path / "back"))
  assert back_tok.encode(["def f1(x): caf\u00e9"]) == tok.encode(["def f1(x): caf\u00e9"])
  assert back_tok.special == tok.special and back_tok.vocab_size == tok.vocab_size  # nothing appended
  assert {k: back_cfg.model[k] for k in hf.read_config(exported).model} == {
    k: cfg.model[k] for k in hf.read_config(exported).model
  }
  flat, back = (dict(jax_leaves(p)) for p in (params, back_params))
  assert flat.keys() == back.keys()
  for k in flat:
    assert flat[k].dtype == back[k].dtype == np.float32 and np.array_equal(flat[k], back[k]), k


def jax_leaves(params):
  import jax  # noqa: PLC0415

  return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)]


def test_bfloat16_and_sharded_exports_load_in_transformers(byte_run, tmp_path):
  out = tmp_path / "bf16"
  lm_cli("export", "hf", "--workdir", str(byte_run), "--out", str(out), "--dtype", "bfloat16", "--max-shard-mb", "0")
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3 and all((out / f).exists() for f in files)  # every tensor alone at a limit of 0 MiB
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  _, _, _, params = workdir_lib.load_params(str(byte_run))
  ml_dtypes = pytest.importorskip("ml_dtypes")
  want = np.asarray(params["layer_0"]["attn"]["wq"]).reshape(32, -1).T.astype(ml_dtypes.bfloat16).astype(np.float32)
  assert np.array_equal(model.model.layers[0].self_attn.q_proj.weight.detach().numpy(), want)


REFUSED = {
  "rope_parameters": ({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, "rope scaling type 'linear'"),
  "attention_bias": (True, "attention_bias=true is not supported"),
  "hidden_act": ("gelu", "hidden_act 'gelu' is not supported"),
  "model_type": ("gpt2", "model_type 'gpt2' is not supported"),
  "sliding_window": (16, "sliding_window 16 is shorter than the context 128"),
  "head_dim": (32, "head_dim 32 is not hidden_size / num_attention_heads"),
}


@pytest.mark.parametrize("key", REFUSED)
def test_what_lm_cannot_run_is_refused_before_anything_is_written(untied_llama, tmp_path, key):
  value, message = REFUSED[key]
  source = tmp_path / "hf"
  shutil.copytree(untied_llama, source)
  config = json.loads((source / "config.json").read_text())
  (source / "config.json").write_text(json.dumps({**config, key: value}))
  with pytest.raises(UserError, match=re.escape(message)):
    hf.import_hf(str(source), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_import_and_export_errors_are_one_line(untied_llama, byte_run, tmp_path):
  source = tmp_path / "hf"
  shutil.copytree(untied_llama, source)
  (source / "tokenizer.json").unlink()
  out = lm_cli("import", "hf", "--from", str(source), "--workdir", str(tmp_path / "run"), check=False)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
    f"lm: error: {source} has no tokenizer.json (lm reads Hugging Face's fast tokenizer files)"
  ]
  assert not (tmp_path / "run").exists()
  for key, value, message in [
    ("lora_rank", 4, "the run has LoRA adapters (model.lora_rank > 0): fold them in with `lm lora merge` first"),
    ("objective", "reward", "the run is a reward model (a scalar head)"),
  ]:
    run = tmp_path / f"run_{key}"
    shutil.copytree(byte_run, run)
    config = json.loads((run / "config.json").read_text())
    config["model" if key == "lora_rank" else "train"][key] = value
    (run / "config.json").write_text(json.dumps(config))
    out = lm_cli("export", "hf", "--workdir", str(run), "--out", str(tmp_path / "out"), check=False)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr
    assert not (tmp_path / "out").exists()


def test_a_sharded_import_reads_each_device_its_part_and_equals_the_whole(untied_llama, tmp_path):
  """On 8 devices with FSDP 4 x tensor 2, no read is larger than a quarter of the largest tensor."""
  code = f"""
import json, numpy as np, jax
from lm import hf, workdir as workdir_lib
mesh = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]
report = hf.import_hf({str(untied_llama)!r}, {str(tmp_path / "sharded")!r}, mesh)
_, _, _, params = workdir_lib.load_params({str(tmp_path / "sharded")!r})
wq = params["layer_0"]["attn"]["wq"]
np.save({str(tmp_path / "wq.npy")!r}, np.asarray(wq))
print(json.dumps({{"largest_read": report["largest_read"], "spec": str(wq.sharding.spec),
  "shard": list(wq.addressable_shards[0].data.shape)}}))
"""
  report = run_devices_script(code)
  assert report["spec"] == "P('fsdp', 'tensor', None)" and report["shard"] == [16, 2, 16]
  assert report["largest_read"] <= 416 * 64 // 4  # embed and lm_head, [416, 64], are the largest
  hf.import_hf(str(untied_llama), str(tmp_path / "whole"))
  _, _, _, params = workdir_lib.load_params(str(tmp_path / "whole"))
  assert np.array_equal(np.load(tmp_path / "wq.npy"), np.asarray(params["layer_0"]["attn"]["wq"]))


def test_an_imported_run_fine_tunes_chats_and_plans(untied_llama, tmp_path):
  imported = tmp_path / "imported"
  hf.import_hf(str(untied_llama), str(imported))
  (tmp_path / "messages.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
  out = lm_cli(
    "chat", "--workdir", str(imported), "--messages", str(tmp_path / "messages.json"), "--json", "--max-new-tokens", "8"
  )
  reply = json.loads(out.stdout)
  assert reply["tokens"] > 0 and reply["finish_reason"] in ("end_of_turn", "length")
  # SFT from it, configured by its own config.json: the chat tokens it was given have rows to learn.
  conversations = write_conversations(tmp_path / "chat.jsonl", 64)
  settings = {
    "train.init_from": imported,
    "data.post_source": conversations,
    "train.steps": 4,
    "train.batch_size": 4,
    "train.eval_every": 4,
    "train.eval_batches": 1,
    "train.checkpoint_every": 4,
    "train.log_every": 1,
    "data.seq_len": 32,
  }
  overrides = [f"--config.{k}={v}" for k, v in settings.items()]
  lm_cli(
    "train", "--config", str(imported / "config.json"), "--workdir", str(tmp_path / "sft"), *overrides, "--no-progress"
  )
  record = json.loads((tmp_path / "sft" / "init_from.json").read_text())
  assert record["run"] == str(imported) and record["step"] == 0
  losses = [
    r["train/loss"]
    for r in map(json.loads, (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines())
    if "train/loss" in r
  ]
  assert len(losses) == 4 and losses[-1] < losses[0]
  if importlib.util.find_spec("libtpu") is not None:  # lm plan compiles its train step for a TPU slice
    plan_args = ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.train.batch_size=8", "--json"]
    out = lm_cli("plan", "--config", str(imported / "config.json"), "--topology", "v5e:2x4", *plan_args)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["fits"] and report["params"]["embedding"] == (416 + 5) * 64  # with the chat tokens


def test_the_hf_benchmark_measures_a_round_trip(tmp_path):
  """`lm bench hf`'s pieces on a tiny config (the benchmark itself builds 134.5M parameters)."""
  from lm import bench_hf  # noqa: PLC0415

  tiny = {
    **bench_hf.SMOLLM_135M,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
  }
  tiny |= {"num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 64}
  layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32  # q and o, k and v (2 kv heads of 8), the MLP, 2 norms
  assert bench_hf.build_model(str(tmp_path / "hf"), tiny, files=20) == 8192 * 32 + 2 * layer + 32  # tied: one embedding
  seconds, rss = bench_hf.timed_lm("import", "hf", "--from", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run"))
  assert seconds > 0 and rss > 0.1
  found = bench_hf.parity(str(tmp_path / "run"), str(tmp_path / "hf"), bench_hf.TEXTS, new_tokens=8)
  assert found["max_abs_logit_diff"] < 1e-4 and found["greedy_equal"] and found["greedy_tokens"] == 8
