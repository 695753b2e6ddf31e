"""The post-training chain's evaluations on the instruction world (`lm.worlds.instructions`).

Each function opens the newest checkpoint of its runs, returns a dict of numbers (a `lm study` step's
result) and, given `out_dir`, writes what it judged to `out_dir/samples.jsonl`, one line per example:
- `chat_accuracy`: exact-match accuracy (`instructions.score`) of a run's replies, overall and per task
  (`accuracy/TASK`), greedy by default;
- `paired`: two `chat_accuracy` results on the same examples, example by example: how many each got that the
  other missed, and McNemar's exact test of the difference;
- `win_rate`: how often run a's reply beats run b's under the world's hidden preference
  (`instructions.judge`, ties half), sampled at temperature 1 by default (the world's docstring says why);
- `reward_accuracy`: how often a reward model scores a held-out pair's chosen reply above its rejected one
  (ties half, as `lm.preference` counts them).

A reply answers the example's prompt as the one user message, rendered with a generation prompt
(`lm.chat.render`), and ends at `<|end|>` (or EOS), or after `max_new_tokens` or when the context
(data.seq_len) is full, whichever comes first. `chat_accuracy(..., prompt_format="plain")` asks a base model
in its pre-training text's own form instead, `Q: <prompt>\nA:` after BOS, and its reply is the text up to
the first newline (the end of an answer there). Example i samples with seed `seed` + i, so its reply does
not depend on the batch it is in (`lm.sampling`): prompts go through the sampler `batch_size` at a time,
the last batch padded with copies of its first prompt so every batch has the same size.
`prompts_per_second` is the whole sampling's rate, compilation included.
"""

import dataclasses
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lm import chat, sample_cli
from lm import sampling as sampling_lib
from lm import workdir as workdir_lib
from lm.data import post
from lm.errors import UserError
from lm.objectives import reward
from lm.sampling import Generation, SamplingParams
from lm.worlds import instructions

MAX_NEW_TOKENS = 64  # the world's longest reply is 44 bytes, then <|end|>
PROMPT_FORMATS = ("chat", "plain")


def chat_prompt(tok, example: instructions.Example) -> list[int]:
  """The prompt ids of an example: its prompt as the one user message, then `<|assistant|>`."""
  return chat.render(tok, [{"role": "user", "content": example.prompt}], generation_prompt=True)[0]


def plain_prompt(tok, example: instructions.Example) -> list[int]:
  """The prompt ids of an example as the world's pre-training text asks it: BOS, then `Q: <prompt>\nA:`."""
  return [tok.bos_id] + tok.encode([f"Q: {example.prompt}\nA:"])[0]


def replies(
  run_dir,
  examples: list[instructions.Example],
  max_new_tokens: int,
  temperature: float,
  seed: int,
  batch_size: int,
  prompt_format: str = "chat",
  step: int | None = None,
) -> tuple[list[Generation], float]:
  """(the run's reply to each example, prompts per second), as the module docstring says."""
  if prompt_format not in PROMPT_FORMATS:
    raise UserError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
  sampler, params, setup = sample_cli.load_sampler(str(run_dir), step)
  tok, context = sampler.tokenizer, sampler.context
  base = SamplingParams(max_new_tokens, temperature, stop_tokens=chat.stop_tokens(tok))
  base.validate()
  prompts = [(chat_prompt if prompt_format == "chat" else plain_prompt)(tok, e) for e in examples]
  requests = []
  for i, ids in enumerate(prompts):
    if len(ids) >= context:
      raise UserError(f"{run_dir}: example {i}'s prompt is {len(ids)} tokens, the whole context of {context}")
    requests.append(dataclasses.replace(base, max_new_tokens=min(max_new_tokens, context - len(ids)), seed=seed + i))
  start = time.perf_counter()
  with setup.context():
    generations = sampler.generate_all(params, prompts, requests, batch_size)
  if prompt_format == "plain":  # the answer is the first line; a reply that reached one ended its turn
    generations = [
      dataclasses.replace(g, text=g.text.split("\n")[0], finish_reason="stop" if "\n" in g.text else g.finish_reason)
      for g in generations
    ]
  return generations, len(prompts) / (time.perf_counter() - start)


def read_examples(eval_path, n: int | None) -> list[instructions.Example]:
  """The first `n` (all if None) examples of an eval.jsonl file (`instructions.write_world`)."""
  if n is not None and n < 1:
    raise UserError(f"n must be at least 1, got {n}")
  try:
    examples = instructions.read_examples(eval_path)
  except FileNotFoundError:
    raise UserError(f"no examples file {eval_path}") from None
  if not examples:
    raise UserError(f"{eval_path} holds no examples")
  return examples[:n]


def write_samples(out_dir, rows: list[dict]) -> None:
  """`out_dir/samples.jsonl`, one JSON object per row; nothing without `out_dir`."""
  if out_dir is not None:
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(out_dir) / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def shares(examples: list[instructions.Example], texts: list[str]) -> dict[str, float]:
  """{"accuracy": the share of correct replies, "preferred_style": the share in the world's preferred style}."""
  return {
    "accuracy": float(np.mean([instructions.score(e, t) for e, t in zip(examples, texts, strict=True)])),
    "preferred_style": float(np.mean([instructions.parse(t)[0] == instructions.PREFERRED_STYLE for t in texts])),
  }


def chat_accuracy(
  run_dir,
  eval_path,
  n: int | None = None,
  max_new_tokens: int = MAX_NEW_TOKENS,
  temperature: float = 0.0,
  seed: int = 0,
  batch_size: int = 64,
  out_dir=None,
  prompt_format: str = "chat",
  samples: int = 1,
) -> dict[str, float]:
  """Exact-match accuracy of the run in `run_dir` on the first `n` examples of `eval_path` (all if None),
  prompted with the chat template or, with `prompt_format="plain"`, as the pre-training text asks. With
  `samples` > 1 (and a temperature above 0) each example is answered that many times, each with its own seed,
  and the accuracy is the mean over all replies: pass@1 estimated from several samples.

  Returns {"accuracy", "n" (examples), "samples", "accuracy/TASK" for each task present, "ended_turn" (the
  share of replies that ended with <|end|> or EOS rather than at the length limit), "preferred_style" (the share
  in the world's preferred answer style), "prompts_per_second"}. samples.jsonl: {task, prompt, answer, reply, correct,
  ended_turn}.
  """
  if samples < 1 or (samples > 1 and temperature == 0):
    raise UserError(f"samples must be 1 for greedy decoding and at least 1 otherwise, got {samples}")
  examples = read_examples(eval_path, n) * samples
  generations, rate = replies(run_dir, examples, max_new_tokens, temperature, seed, batch_size, prompt_format)
  correct = [instructions.score(e, g.text) for e, g in zip(examples, generations, strict=True)]
  by_task = {}
  for e, right in zip(examples, correct, strict=True):
    by_task.setdefault(e.task, []).append(right)
  write_samples(
    out_dir,
    [
      {
        "task": e.task,
        "prompt": e.prompt,
        "answer": e.answer,
        "reply": g.text,
        "correct": right,
        "ended_turn": g.finish_reason == "stop",
      }
      for e, g, right in zip(examples, generations, correct, strict=True)
    ],
  )
  return {
    **shares(examples, [g.text for g in generations]),
    "n": len(examples) // samples,
    "samples": samples,
    **{f"accuracy/{task}": float(np.mean(rights)) for task, rights in sorted(by_task.items())},
    "ended_turn": float(np.mean([g.finish_reason == "stop" for g in generations])),
    "prompts_per_second": rate,
  }


def paired(before_dir, after_dir) -> dict:
  """Two `chat_accuracy` runs on the same examples (their `samples.jsonl`), compared example by example:
  `gained` (wrong before, right after), `lost` (the reverse), and the exact two-sided McNemar p-value of so
  lopsided a split of the `gained + lost` discordant examples if either were equally likely (`p_value`)."""
  read = lambda d: [json.loads(line) for line in (epath.Path(d) / "samples.jsonl").read_text().splitlines()]  # noqa: E731
  before, after = read(before_dir), read(after_dir)
  if [b["prompt"] for b in before] != [a["prompt"] for a in after]:
    raise UserError(f"{before_dir} and {after_dir} did not answer the same examples in the same order")
  gained = sum(not b["correct"] and a["correct"] for b, a in zip(before, after, strict=True))
  lost = sum(b["correct"] and not a["correct"] for b, a in zip(before, after, strict=True))
  n, k = gained + lost, min(gained, lost)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
  return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail), "n": len(before)}


def win_rate(
  run_a,
  run_b,
  eval_path,
  n: int | None = None,
  max_new_tokens: int = MAX_NEW_TOKENS,
  temperature: float = 1.0,
  seed: int = 0,
  batch_size: int = 64,
  out_dir=None,
  step_a: int | None = None,
) -> dict[str, float]:
  """How often run a's reply (its checkpoint `step_a`, else the newest) beats run b's on the first `n` examples
  of `eval_path` (all if None), judged by the world's hidden preference (`instructions.judge`: correct first,
  then the preferred style; ties half).

  Both runs sample with the same seeds. Returns {"win_rate", "n", "accuracy_a", "accuracy_b",
  "preferred_style_a", "preferred_style_b"}. samples.jsonl: {task, prompt, answer, reply_a, reply_b, judge}.
  """
  examples = read_examples(eval_path, n)
  texts = {}
  for name, run, step in (("a", run_a, step_a), ("b", run_b, None)):
    generations, _ = replies(run, examples, max_new_tokens, temperature, seed, batch_size, step=step)
    texts[name] = [g.text for g in generations]
  judged = [instructions.judge(e, a, b) for e, a, b in zip(examples, texts["a"], texts["b"], strict=True)]
  write_samples(
    out_dir,
    [
      {"task": e.task, "prompt": e.prompt, "answer": e.answer, "reply_a": a, "reply_b": b, "judge": j}
      for e, a, b, j in zip(examples, texts["a"], texts["b"], judged, strict=True)
    ],
  )
  result = {"win_rate": instructions.win_rate(examples, texts["a"], texts["b"]), "n": len(examples)}
  for name in ("a", "b"):
    result |= {f"{key}_{name}": value for key, value in shares(examples, texts[name]).items()}
  return result


def reward_accuracy(rm_run_dir, pairs_path, n: int | None = None, batch_size: int = 64, out_dir=None) -> dict:
  """The share of the first `n` pairs of `pairs_path` (a JSONL file of preference pairs, `lm.data.post`'s
  forms; all if None) whose chosen reply the reward model in `rm_run_dir` scores above the rejected one,
  a tie counting half.

  Pairs are rendered, cut (data.seq_len, data.overlong) and scored as the run's training data is
  (`lm.objectives.reward.rewards`: the score at each row's last real token), in batches of `batch_size` rows
  (two per pair). Returns {"accuracy", "n" (pairs scored), "margin" (the mean reward of chosen minus rejected),
  "truncated" (pairs cut to fit), "dropped" (pairs left out, as `lm.data.post.tokenize` says)}.
  samples.jsonl: {where, reward_chosen, reward_rejected} for each pair scored, `where` its PATH:LINE.
  """
  if batch_size < 2 or batch_size % 2:
    raise UserError(f"batch_size must be a positive even number (rows of pairs), got {batch_size}")
  if n is not None and n < 1:
    raise UserError(f"n must be at least 1, got {n}")
  cfg, tok, setup, params = workdir_lib.load_params(str(rm_run_dir))
  if setup.model.cfg.head != "scalar":
    raise UserError(f"{rm_run_dir} is not a reward model: its model's head is {setup.model.cfg.head!r}, not 'scalar'")
  records = post.read_records(cfg, f"jsonl:{pairs_path}")[:n]
  if not records:
    raise UserError(f"{pairs_path} holds no pairs")
  kept, examples, truncated = [], [], 0
  for record in records:  # one at a time, so each example is known by its record
    data = post.tokenize(tok, [record], [post.pair(record)], "preference", cfg.data.seq_len, overlong=cfg.data.overlong)
    kept += [record.where] * len(data.examples)
    examples += data.examples
    truncated += data.truncated
  if not examples:
    raise UserError(f"every pair of {pairs_path} was dropped (too long with data.overlong=drop, or no reply left)")
  eval_set = post.make_eval_set(post.Dataset("preference", cfg.data.seq_len, examples), batch_size)
  score = jax.jit(functools.partial(reward.rewards, setup.model))
  with setup.context():
    rewards_B = np.concatenate([np.asarray(score(params, batch)) for batch in eval_set.batches])
  chosen, rejected = rewards_B[0 : 2 * len(examples) : 2], rewards_B[1 : 2 * len(examples) : 2]
  write_samples(
    out_dir,
    [
      {"where": where, "reward_chosen": float(c), "reward_rejected": float(r)}
      for where, c, r in zip(kept, chosen, rejected, strict=True)
    ],
  )
  return {
    "accuracy": float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected))),
    "n": len(examples),
    "margin": float(np.mean(chosen - rejected)),
    "truncated": truncated,
    "dropped": len(records) - len(examples),
  }


def reward_and_kl(
  run_dir,
  reference_dir,
  rm_dir,
  eval_path,
  n: int | None = None,
  step: int | None = None,
  max_new_tokens: int = MAX_NEW_TOKENS,
  temperature: float = 1.0,
  seed: int = 0,
  batch_size: int = 64,
) -> dict[str, float]:
  """Where a policy checkpoint sits on the reward-KL plane: its replies to the first `n` examples of `eval_path`
  (sampled at `temperature`, example i with seed `seed` + i), their mean score under the reward model in `rm_dir`
  (`reward`), and KL(policy || reference) estimated on them (`kl`: the mean over replies of the summed
  log-ratio of the policy in `run_dir` (checkpoint `step`, else the newest) to the reference run's, over the
  reply's tokens and its end-of-turn token). Also `accuracy` and `preferred_style` of the replies, and `step`.
  Run in one process."""
  from lm.objectives import rl  # noqa: PLC0415

  examples = read_examples(eval_path, n)
  cfg, tok, setup, restored = workdir_lib.load_checkpoint(str(run_dir), step)
  params = restored.state.params
  sampler = sampling_lib.Sampler.for_model(setup.model, cfg.data.seq_len, tok)
  stops = chat.stop_tokens(tok)
  prompts = [chat_prompt(tok, e) for e in examples]
  responses = []
  with setup.context():
    for lo in range(0, len(prompts), batch_size):
      batch = prompts[lo : lo + batch_size]
      requests = [
        SamplingParams(
          min(max_new_tokens, cfg.data.seq_len - len(p)), temperature, stop_tokens=stops, seed=seed + lo + i
        )
        for i, p in enumerate(batch)
      ]
      *_, last = sampler.stream(
        rl.model_params(params), batch, requests, first_chunk=max_new_tokens, chunk=max_new_tokens
      )
      responses += last.tokens
  rows, texts, _, _ = rl.response_rows(tok, prompts, responses, cfg.data.seq_len, set(stops) | {sampler.eos_id})

  def summed_logps(workdir, params_=None, setup_=None):
    if params_ is None:
      _, _, setup_, params_ = workdir_lib.load_params(str(workdir))
    logps = jax.jit(lambda p, b: jnp.sum(rl.token_logps(setup_.model, p, b)[0] * b["loss_mask"], axis=1))
    with setup_.context():
      return np.concatenate(
        [np.asarray(logps(params_, _slice(rows, lo, batch_size))) for lo in range(0, len(prompts), batch_size)]
      )

  policy, reference = summed_logps(run_dir, params, setup), summed_logps(reference_dir)
  _, _, rm_setup, rm_params = workdir_lib.load_params(str(rm_dir))
  score = jax.jit(functools.partial(reward.rewards, rm_setup.model))
  with rm_setup.context():
    scores = np.concatenate(
      [np.asarray(score(rm_params, _slice(rows, lo, batch_size))) for lo in range(0, len(prompts), batch_size)]
    )
  return {
    "step": int(restored.step),
    "reward": float(np.mean(scores)),
    "kl": float(np.mean(policy - reference)),
    **shares(examples, texts),
    "n": len(examples),
  }


def _slice(rows: dict, lo: int, size: int) -> dict:
  return {k: v[lo : lo + size] for k, v in rows.items()}


def frontier(runs: dict, reference_dir, rm_dir, eval_path, out_dir, n: int = 128, seed: int = 0) -> dict:
  """`reward_and_kl` of every checkpoint of each run in `runs` ({label: run_dir}) and of the reference itself,
  plotted as reward against KL (`out_dir/frontier.png`, one line per run through its checkpoints in order);
  returns {label: [points]} (also in `out_dir/frontier.json`), the reference under "reference"."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  from lm import checkpoint as checkpoint_lib  # noqa: PLC0415

  points = {"reference": [reward_and_kl(reference_dir, reference_dir, rm_dir, eval_path, n, seed=seed)]}
  for label, run in runs.items():
    directory = checkpoint_lib.checkpoint_dir(str(run))
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    points[label] = [reward_and_kl(run, reference_dir, rm_dir, eval_path, n, step=s, seed=seed) for s in steps]
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "frontier.json").write_text(json.dumps(points, indent=2))
  fig, ax = plt.subplots(figsize=(6, 4.5))
  base = points["reference"][0]
  ax.scatter([0.0], [base["reward"]], color="black", zorder=3, label="SFT (reference)")
  for label, run_points in points.items():
    if label == "reference":
      continue
    xs, ys = [0.0] + [p["kl"] for p in run_points], [base["reward"]] + [p["reward"] for p in run_points]
    ax.plot(xs, ys, marker="o", label=label)
    ax.annotate(
      f"step {run_points[-1]['step']}", (xs[-1], ys[-1]), fontsize=8, xytext=(4, 4), textcoords="offset points"
    )
  ax.set_xlabel("KL(policy || SFT) per reply, nats")
  ax.set_ylabel("reward model score")
  ax.set_title("Reward against KL on held-out prompts")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "frontier.png", dpi=120)
  plt.close(fig)
  return points


def sampled_pairs(
  run_dir, examples_path, out_path, n: int | None = None, temperature: float = 1.0, seed: int = 0, batch_size: int = 64
) -> dict:
  """Preference pairs of a run's own replies, labelled by the world's hidden rule, as InstructGPT's labellers
  ranked its SFT model's samples: two replies to each of the first `n` examples of `examples_path` (seeds `seed`
  + i and `seed` + n + i), the one `instructions.judge` prefers chosen; ties are left out. Writes TRL's standard
  form `{"prompt", "chosen", "rejected"}` to `out_path` (JSONL) and returns the counts of pairs, of ties, and of
  pairs with neither, one or both replies correct (one: they differ in correctness; else only in style)."""
  examples = read_examples(examples_path, n)
  first, _ = replies(run_dir, examples, MAX_NEW_TOKENS, temperature, seed, batch_size)
  second, _ = replies(run_dir, examples, MAX_NEW_TOKENS, temperature, seed + len(examples), batch_size)
  rows, counts = [], {"pairs": 0, "ties": 0, "neither_correct": 0, "one_correct": 0, "both_correct": 0}
  for e, a, b in zip(examples, first, second, strict=True):
    verdict = instructions.judge(e, a.text, b.text)
    if verdict == 0.5:
      counts["ties"] += 1
      continue
    chosen, rejected = (a.text, b.text) if verdict == 1.0 else (b.text, a.text)
    rows.append({"prompt": e.prompt, "chosen": chosen, "rejected": rejected})
    counts["pairs"] += 1
    counts[
      ("neither_correct", "one_correct", "both_correct")[instructions.score(e, a.text) + instructions.score(e, b.text)]
    ] += 1
  epath.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(out_path).write_text("".join(json.dumps(r) + "\n" for r in rows))
  return counts
