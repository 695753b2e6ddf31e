"""`lm bench hf`: a Llama of SmolLM-135M's shapes round-tripped through `lm import hf` and `lm export hf`.

Builds the model with transformers from a config (random weights, saved in bf16) and a byte-level BPE
tokenizer trained on the standard library, nothing downloaded; times the import and the export as
separate `lm` processes (wall time, peak RSS), then checks the logits (left-padded rows, f32) and up to 32
greedy tokens (both stop at the eos) of the imported run against transformers, and of the exported directory likewise.
`--workdir RUN` also exports that run and checks it the same way. Needs the test extras (transformers,
torch). Prints one JSON line.
"""

import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

from lm.errors import UserError

SMOLLM_135M = dict(
  vocab_size=49152,
  hidden_size=576,
  intermediate_size=1536,
  num_hidden_layers=30,
  num_attention_heads=9,
  num_key_value_heads=3,
  max_position_embeddings=2048,
  rms_norm_eps=1e-5,
  rope_theta=10_000.0,
  tie_word_embeddings=True,
  bos_token_id=0,
  eos_token_id=0,
)
TEXTS = [
  "The quick brown fox jumps over the lazy dog.",
  "def main():\n    return 0\n",
  "caf\u00e9 \u4e2d\u6587 \U0001f600",
  "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
]


def build_model(path: str, config: dict, files: int = 400) -> int:
  """Writes a random transformers Llama of `config` and a byte-level BPE tokenizer trained on `files` standard
  library files; returns the model's size."""
  import tokenizers  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))[:files]
  tk = tokenizers.Tokenizer(models.BPE())
  tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=8192, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tk.train_from_iterator((open(f, encoding="utf-8", errors="ignore").read() for f in files), trainer)
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
  ).save_pretrained(path)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
  model.save_pretrained(path)
  return sum(p.numel() for p in model.parameters())


def timed_lm(*args: str) -> tuple[float, float]:
  """(wall seconds, peak RSS GiB) of one `lm` command in its own process."""
  start = time.time()
  code = "import resource, sys; from lm import cli; s = cli.main(sys.argv[1:]); "
  code += "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(s)"
  out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
  if out.returncode:
    raise UserError(f"lm {' '.join(args)} failed: {out.stderr.strip().splitlines()[-1]}")
  return round(time.time() - start, 1), round(int(out.stderr.strip().splitlines()[-1]) / 2**20, 2)


def parity(run: str, hf_dir: str, texts: list[str], new_tokens: int = 32) -> dict:
  """Largest |logit difference| between the run and transformers on left-padded rows, and greedy agreement."""
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  from lm import model as model_lib  # noqa: PLC0415
  from lm import sampling  # noqa: PLC0415
  from lm import workdir as workdir_lib  # noqa: PLC0415

  _, tok, setup, params = workdir_lib.load_params(run)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    hf_dir, dtype=torch.float32, attn_implementation="eager"
  )
  ids = [[tok.bos_id] + x for x in tok.encode(texts)]
  t = max(map(len, ids))
  batch = {k: np.zeros((len(ids), t), np.int32) for k in ("inputs", "segment_ids", "positions")}
  for i, x in enumerate(ids):
    batch["inputs"][i, t - len(x) :], batch["segment_ids"][i, t - len(x) :] = x, 1
    batch["positions"][i, t - len(x) :] = np.arange(len(x))
  ours = np.asarray(model_lib.forward(setup.model, params, batch))
  with torch.no_grad():
    theirs = reference(
      input_ids=torch.tensor(batch["inputs"]).long(),
      attention_mask=torch.tensor(batch["segment_ids"]),
      position_ids=torch.tensor(batch["positions"]).long(),
    ).logits.numpy()
    prompt = torch.tensor([ids[0]])
    generated = reference.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_id)
  vocab = min(ours.shape[-1], theirs.shape[-1])  # lm's appended chat tokens are not in an imported model
  real = batch["segment_ids"].astype(bool)
  sampler = sampling.Sampler.for_model(setup.model, setup.cfg.data.seq_len, tok)
  request = sampling.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)  # both stop at the eos
  with setup.context():
    greedy = sampler.generate(params, [ids[0]], [request])[0].tokens
  return {
    "max_abs_logit_diff": float(np.abs(ours[..., :vocab] - theirs[..., :vocab])[real].max()),
    "max_abs_logit": float(np.abs(theirs[real]).max()),
    "tokens": int(real.sum()),
    "greedy_equal": list(greedy) == until_eos(generated[0, prompt.shape[1] :].tolist(), tok.eos_id),
    "greedy_tokens": len(greedy),
  }


def until_eos(ids: list[int], eos: int) -> list[int]:
  return ids[: ids.index(eos)] if eos in ids else ids


def main(args) -> dict:
  try:
    import transformers  # noqa: F401, PLC0415
  except ImportError:
    raise UserError("lm bench hf needs transformers and torch: pip install -c constraints.txt -e '.[test]'") from None
  root = tempfile.mkdtemp(prefix="lm_bench_hf_")
  source, run, out = (os.path.join(root, name) for name in ("hf", "imported", "exported"))
  record = {"model": "SmolLM-135M shapes, random, bf16", "params": build_model(source, SMOLLM_135M)}
  record["import_s"], record["import_peak_rss_gib"] = timed_lm(
    "import", "hf", "--from", source, "--workdir", run, "--seq-len", "512"
  )
  record["export_s"], record["export_peak_rss_gib"] = timed_lm("export", "hf", "--workdir", run, "--out", out)
  record["import_parity"] = parity(run, source, TEXTS)
  record["export_parity"] = parity(run, out, TEXTS)
  if args.workdir:
    theirs = os.path.join(root, "run_exported")
    record["run"] = args.workdir
    record["run_export_s"], _ = timed_lm("export", "hf", "--workdir", args.workdir, "--out", theirs)
    record["run_parity"] = parity(
      args.workdir, theirs, ["import os\nimport sys\n\ndef main(", "class Foo:", "# Copyright"]
    )
  return record
