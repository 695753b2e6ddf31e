"""lm import hf / lm export hf against transformers' own Llama (test extras: transformers and torch, CPU).

Every model here is built locally: a randomly initialised transformers Llama with a byte-level BPE tokenizer
trained on a few standard-library files, and a tiny lm run. Nothing is downloaded.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lm import hf, train  # noqa: E402
from lm import model as model_lib  # noqa: E402
from lm import workdir as workdir_lib  # noqa: E402

from conftest import REPO, tiny_config  # noqa: E402

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
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # not ones: a transposed or misplaced norm would show
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(str(path))


@pytest.fixture(scope="module", params=["untied", "tied"])
def hf_llama(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  make_hf_llama(path, tied=request.param == "tied")
  return path


def lm_cli(*args, check=True):
  out = subprocess.run(
    [sys.executable, "-m", "lm.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300, check=False
  )
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


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
  batch = padded(tok, TEXTS)
  logits = np.asarray(model_lib.forward(setup.model, params, batch))
  real = batch["segment_ids"].astype(bool)
  np.testing.assert_allclose(logits[..., :vocab][real], hf_logits(reference, batch)[real], atol=1e-4, rtol=0)
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


@pytest.fixture(scope="module", params=["byte", "sentencepiece"])
def lm_run(request, tmp_path_factory):
  """A tiny trained lm run (untied for bytes, tied for sentencepiece) on Python-like text."""
  root = tmp_path_factory.mktemp(f"lm_{request.param}")
  (root / "corpus.txt").write_text(
    "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # caf\u00e9\n\n" for i in range(2000))
  )
  overrides = {
    "data.source": f"text:{root / 'corpus.txt'}",
    "tokenizer.kind": request.param,
    "train.steps": 20,
    "data.seq_len": 64,
  }
  if request.param == "sentencepiece":
    overrides |= {"tokenizer.vocab_size": 300, "model.tie_embeddings": True}
  train.train(tiny_config(**overrides), str(root / "run"), progress=False)
  return root / "run"


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
  np.testing.assert_allclose(logits[real], hf_logits(reference, batch)[real], atol=1e-4, rtol=0)
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


def test_bfloat16_and_sharded_exports_load_in_transformers(lm_run, tmp_path):
  if "sentencepiece" in str(lm_run):
    pytest.skip("one tokenizer kind is enough for the file layout")
  out = tmp_path / "bf16"
  lm_cli("export", "hf", "--workdir", str(lm_run), "--out", str(out), "--dtype", "bfloat16", "--max-shard-mb", "0")
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3 and all((out / f).exists() for f in files)  # every tensor alone at a limit of 0 MiB
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
  _, _, _, params = workdir_lib.load_params(str(lm_run))
  ml_dtypes = pytest.importorskip("ml_dtypes")
  want = np.asarray(params["layer_0"]["attn"]["wq"]).reshape(32, -1).T.astype(ml_dtypes.bfloat16).astype(np.float32)
  assert np.array_equal(model.model.layers[0].self_attn.q_proj.weight.detach().numpy(), want)
