"""The knowledge study's measurements on the people world (`lm.worlds.people`, experiments/knowledge.py).

Each function opens the newest checkpoint of a run, returns a dict of numbers (a `lm study` step's result)
and, given `out_dir`, writes what it judged to `out_dir/samples.jsonl`.
- `recall`: a base model completes the first template of each attribute ("NAME was born in"): did
  pre-training store the fact where it was read?
- `qa`: questions about the people of some groups, one user message each (greedy): accuracy, refusal rate
  and hallucination rate (a reply that neither declines nor is right: on people the model never saw, every
  answer that does not decline); optionally with a tool (`lm.tools`) or with the person's record pasted
  before the question (`in_context`).
- `interrogate`: self-interrogation. Every question about the probe groups (every phrasing) is answered
  greedily and sampled `samples` more times at temperature 1; the confidence of the greedy answer is the
  share of samples that agree with it, ties broken by its mean token log-probability. The SFT set it writes
  keeps the true answer where the greedy answer was right and confident (confidence at least `threshold`),
  and declines the rest (`people.refusal_text`). The same confidence on the test groups gives the average
  precision with which it ranks correct answers above wrong ones (`confidence_ap`).
- `familiarity`: does the model know a name when it reads one? The log-probability of each person's name in a
  question, and the average precision with which it ranks the people pre-training saw above those it never
  did: whether the model holds the signal an "I don't know" needs, whatever it says.
- `value_confidence`: how sure is the model of a value where it would say one, in a biography's words or in
  its reply to a question? The share of the likeliest of the attribute's values, and how well it tells known
  people from never-seen ones.
- `refusal`: a refusal-tuned run against the run it started from, on the test groups (see its docstring).
- `probe`: linear probes of each layer's hidden state, at the name and where the answer starts: where can
  "I have read this name" be read off the model?
- `gate`: declining by familiarity instead of by tuning: a run answers only when the name's log-probability
  is above a cut set on the probe groups.
- `identity`: "Who are you?" with and without a system prompt naming an identity.

Generation goes through `answer`, which runs tool calls (`lm.tools`) and samples in fixed-size batches, so
a question's reply does not depend on the batch it is in (question i samples with seed `seed` + i).
"""

import json

import numpy as np
from etils import epath

from lm import chat, sample_cli, tools
from lm.errors import UserError
from lm.sampling import SamplingParams
from lm.worlds import people

MAX_NEW_TOKENS = 64  # the longest answer sentence is about 50 bytes, a tool call about 30
BATCH = 64


def read_jsonl(path) -> list[dict]:
  try:
    return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]
  except FileNotFoundError:
    raise UserError(f"no file {path} (write the world first)") from None


def write_samples(out_dir, rows: list[dict]) -> None:
  if out_dir is not None:
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(out_dir) / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def questions(world, groups) -> list[dict]:
  """The rows of `world/questions.jsonl` about people of `groups`."""
  rows = [r for r in read_jsonl(f"{world}/questions.jsonl") if r["group"] in groups]
  if not rows:
    raise UserError(f"{world}/questions.jsonl holds no questions about {', '.join(groups)}")
  return rows


class Model:
  """A run's sampler and params, loaded once for several calls of `answer`."""

  def __init__(self, run_dir, step: int | None = None):
    self.run_dir = str(run_dir)
    self.sampler, self.params, self.setup = sample_cli.load_sampler(self.run_dir, step)
    self.tok = self.sampler.tokenizer

  def generate(self, prompts: list[list[int]], temperature: float, seed: int, max_new_tokens: int = MAX_NEW_TOKENS):
    requests = []
    for i, ids in enumerate(prompts):
      room = self.sampler.context - len(ids)
      if room < 1:
        raise UserError(f"{self.run_dir}: prompt {i} is {len(ids)} tokens, the whole context")
      requests.append(
        SamplingParams(min(max_new_tokens, room), temperature, stop_tokens=chat.stop_tokens(self.tok), seed=seed + i)
      )
    with self.setup.context():
      return self.sampler.generate_all(self.params, prompts, requests, BATCH)


def answer(
  model: Model, conversations: list[list[dict]], temperature: float = 0.0, seed: int = 0, tool_fns=None, max_calls=2
) -> list[dict]:
  """Each conversation's reply: {"reply", "logprob" (the reply's mean token log-probability), "calls",
  "messages" (what was added: tool calls, their results, the reply)}. Tool calls in `tool_fns`
  ({name: function}) run as `lm.tools` says, at most `max_calls` per conversation."""
  tool_fns = tool_fns or {}
  added = [[] for _ in conversations]
  results: list[dict | None] = [None] * len(conversations)
  active = list(range(len(conversations)))
  for round_ in range(max_calls + 1):
    if not active:
      break
    prompts = [chat.render(model.tok, conversations[i] + added[i], generation_prompt=True)[0] for i in active]
    # a round's seeds are offset by the round, so a second turn does not replay the first's draws
    generations = model.generate(prompts, temperature, seed + round_ * len(conversations))
    still = []
    for i, g in zip(active, generations, strict=True):
      text = g.text
      call = tools.parse_call(text, tool_fns) if tool_fns and round_ < max_calls else None
      if call is None:
        lp = float(np.mean(g.logprobs)) if g.logprobs else 0.0
        added[i].append({"role": "assistant", "content": text})
        results[i] = {"reply": text, "logprob": lp, "calls": round_, "messages": added[i]}
        continue
      name, argument = call
      result = argument if not name else tool_fns[name](argument)  # a malformed call's argument is its error
      added[i] += [{"role": "assistant", "content": text}, {"role": "tool", "content": result}]
      still.append(i)
    active = still
  return results


def user(prompt: str, system: str | None = None) -> list[dict]:
  return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def judge_rows(rows: list[dict], replies: list[dict]) -> list[dict]:
  out = []
  for r, a in zip(rows, replies, strict=True):
    verdict = people.check(r["attributes"], r["attribute"], a["reply"])
    out.append(
      {
        "group": r["group"],
        "prompt": r["prompt"],
        "answer": r["answer"],
        "reply": a["reply"],
        "verdict": verdict,
        "calls": a["calls"],
        "logprob": a["logprob"],
        **({"transcript": a["messages"]} if a["calls"] else {}),
      }
    )
  return out


def rates(judged: list[dict]) -> dict:
  """accuracy, refusal and hallucination (neither right nor declining) rates of judged rows."""
  verdicts = [j["verdict"] for j in judged]
  return {
    "accuracy": float(np.mean([v == "correct" for v in verdicts])),
    "refusal": float(np.mean([v == "refusal" for v in verdicts])),
    "hallucination": float(np.mean([v == "wrong" for v in verdicts])),
    "n": len(verdicts),
  }


def qa(
  run_dir,
  world,
  groups=("test_known", "test_unknown"),
  out_dir=None,
  tool: str | None = None,
  in_context: bool = False,
  max_calls: int = 2,
) -> dict:
  """Greedy accuracy, refusal and hallucination rates of a run on the questions about each of `groups`
  (`GROUP/accuracy`, ...). `tool` is a `--tool` spec (`lm.tools`); `in_context` pastes the person's record
  before the question. samples.jsonl: {group, prompt, answer, reply, verdict, calls, logprob}."""
  rows = questions(world, groups)
  records = {r["id"]: r["text"] for r in read_jsonl(f"{world}/records.jsonl")}
  convs = [user(f"{records[r['person']]}\n{r['prompt']}" if in_context else r["prompt"]) for r in rows]
  tool_fns = tools.make_tools([tool] if tool else [])
  judged = judge_rows(rows, answer(Model(run_dir), convs, tool_fns=tool_fns, max_calls=max_calls))
  write_samples(out_dir, judged)
  out = {}
  for group in groups:
    for k, v in rates([j for j in judged if j["group"] == group]).items():
      out[f"{group}/{k}"] = v
  out["tool_calls"] = float(np.mean([j["calls"] for j in judged]))
  return out


def recall(run_dir, world, groups=("sft", "test_known"), out_dir=None) -> dict:
  """How often a base model completes "<first template up to the value>" with the person's value, per group
  (`GROUP/recall`): the fact as pre-training stored it, before any question was asked."""
  model = Model(run_dir)
  rows = questions(world, groups)
  prompts, stems = [], []
  for r in rows:
    # the stem stops before the value's space: a subword tokenizer reads the space with the value
    stem = f"{r['person']} {people.relation(r['attribute'])}"
    stems.append(stem)
    prompts.append([model.tok.bos_id] + model.tok.encode([stem])[0])
  generations = model.generate(prompts, 0.0, 0, max_new_tokens=24)
  judged = []
  for r, stem, g in zip(rows, stems, generations, strict=True):
    judged.append({"group": r["group"], "stem": stem, "answer": r["answer"], "completion": g.text,
                   "correct": g.text.strip().startswith(r["answer"])})  # fmt: skip
  write_samples(out_dir, judged)
  return {f"{g}/recall": float(np.mean([j["correct"] for j in judged if j["group"] == g])) for g in groups}


def average_precision(scores, labels) -> float:
  """The average precision of ranking by `scores` (descending) the items whose label is true: the mean, over
  the true items, of the precision of the ranking cut at each of them (0 when none is true)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  hits = np.asarray(labels, bool)[order]
  if not hits.any():
    return 0.0
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(np.mean(precision[hits]))


def confidences(model: Model, rows: list[dict], samples: int, seed: int = 0) -> list[dict]:
  """Each question's greedy reply and its confidence: the share of `samples` replies at temperature 1 that
  agree with it, plus 0.01 * exp(its mean token log-probability) to order equal shares."""
  convs = [user(r["prompt"]) for r in rows]
  greedy = answer(model, convs)
  drawn = [answer(model, convs, temperature=1.0, seed=seed + 1 + k * len(rows)) for k in range(samples)]
  out = []
  for i, (r, g) in enumerate(zip(rows, greedy, strict=True)):
    agree = np.mean([" ".join(d[i]["reply"].split()) == " ".join(g["reply"].split()) for d in drawn])
    confidence = float(agree + 0.01 * np.exp(g["logprob"]))
    verdict = people.check(r["attributes"], r["attribute"], g["reply"])
    out.append({**r, "reply": g["reply"], "logprob": g["logprob"], "confidence": confidence, "verdict": verdict})
  return out


def interrogate(
  run_dir,
  world,
  out_dir,
  samples: int = 4,
  threshold: float = 0.5,
  probe_groups=("sft", "probe_known", "probe_unknown"),
  test_groups=("test_known", "test_unknown"),
) -> dict:
  """Self-interrogation (module docstring): writes `out_dir/refusal_train.jsonl`, SFT conversations on every
  phrasing of every question about `probe_groups`, and returns the share of each group's questions kept
  (`GROUP/kept`), the confidence's average precision on `test_groups` (`confidence_ap`), that of the
  log-probability alone (`logprob_ap`), the greedy accuracy there (`test_accuracy`) and `familiarity` there."""
  model = Model(run_dir)
  rows = []
  for r in questions(world, probe_groups):
    for k, phrasing in enumerate(people.ATTRIBUTES[r["attribute"]].questions):
      rows.append({**r, "phrasing": k, "prompt": phrasing.format(name=r["person"])})
  probed = confidences(model, rows, samples)
  convs = []
  for p in probed:
    p["kept"] = p["verdict"] == "correct" and p["confidence"] >= threshold
    reply = people.answer_text(p["attribute"], p["answer"]) if p["kept"] else people.refusal_text(p["attribute"])
    convs.append({"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": reply}]})
  np.random.default_rng(0).shuffle(convs)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "refusal_train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
  tested = confidences(model, questions(world, test_groups), samples, seed=10_000_000)
  write_samples(out_dir, [{k: v for k, v in p.items() if k != "attributes"} for p in probed + tested])
  correct = [t["verdict"] == "correct" for t in tested]
  result = {f"{g}/kept": float(np.mean([p["kept"] for p in probed if p["group"] == g])) for g in probe_groups}
  result.update(
    {
      "confidence_ap": average_precision([t["confidence"] for t in tested], correct),
      "logprob_ap": average_precision([t["logprob"] for t in tested], correct),
      "test_accuracy": float(np.mean(correct)),
      "refusal_train": str(out / "refusal_train.jsonl"),
      "n_train": len(convs),
      **familiarity(run_dir, world, test_groups),
    }
  )
  return result


def name_logprobs(scorer, rows: list[dict]) -> list[float]:
  """The log-probability (all its tokens) of the person's name in each row's question, read as plain text after
  the question's words before it."""
  tok = scorer.tok
  pairs = []
  for r in rows:
    before = r["prompt"][: r["prompt"].index(r["person"])].rstrip()  # a subword tokenizer reads the space with the name
    pairs.append(([tok.bos_id] + tok.encode([before])[0], tok.encode([" " + r["person"]])[0]))
  return [lp for lp, _ in scorer.loglikelihood(pairs)]


def familiarity(run_dir, world, groups=("test_known", "test_unknown")) -> dict:
  """The log-probability of each person's name in the first question about them (`name_logprobs`) and the
  average precision with which it ranks the people of pre-training (`people.PRETRAINED_GROUPS`) above the others:
  `name_familiarity_ap`, `name_logprob_GROUP` (the mean)."""
  from lm.evals import scoring  # noqa: PLC0415

  firsts = {}
  for r in questions(world, groups):
    firsts.setdefault(r["person"], r)
  logps = name_logprobs(scoring.Scorer.from_run(str(run_dir)), list(firsts.values()))
  of = np.array([r["group"] for r in firsts.values()])
  out = {"name_familiarity_ap": average_precision(logps, np.isin(of, people.PRETRAINED_GROUPS))}
  for group in groups:
    out[f"name_logprob_{group}"] = float(np.mean(np.asarray(logps)[of == group]))
  return out


def logistic_fit(x_NxD, y_N, l2: float = 1.0, steps: int = 500) -> tuple[np.ndarray, float]:
  """An L2-penalised logistic regression of labels `y_N` on features `x_NxD` (standardise them first), by
  Newton's method: (weights [D], bias). The penalty is `l2` / 2 * |w|^2 on the mean log-loss times N."""
  x = np.concatenate([np.asarray(x_NxD, np.float64), np.ones((len(x_NxD), 1))], axis=1)
  y = np.asarray(y_N, np.float64)
  penalty = np.full(x.shape[1], l2)
  penalty[-1] = 0.0  # the bias is not penalised
  w = np.zeros(x.shape[1])
  for _ in range(steps):
    p = 1 / (1 + np.exp(-x @ w))
    grad = x.T @ (p - y) + penalty * w
    hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty)
    step = np.linalg.solve(hess, grad)
    w -= step
    if np.max(np.abs(step)) < 1e-8:
      break
  return w[:-1], float(w[-1])


def probe(run_dir, world, calibrate=("probe_known", "probe_unknown"), test=("test_known", "test_unknown")) -> dict:
  """Where is "I have read this name" linearly readable? For each layer's output (`layer_i`; the last one after
  the final norm) at two positions of each question, the name's last token (`name`) and the prompt's last, where
  the answer starts (`answer`), a logistic regression (`logistic_fit`) trained on the questions about `calibrate`
  to tell pre-trained people (`people.PRETRAINED_GROUPS`) from the others, and its average precision on the
  questions about `test`: `probe_ap/POSITION/layer_i`, and `probe_train_accuracy/POSITION/layer_i`.
  Needs a run without `model.scan_layers`."""
  import jax  # noqa: PLC0415

  from lm import workdir as workdir_lib  # noqa: PLC0415

  cfg, tok, setup, restored = workdir_lib.load_checkpoint(str(run_dir))
  if cfg.model.scan_layers:
    raise UserError(f"{run_dir}: probe reads each layer's output, which model.scan_layers stacks away")
  rows = questions(world, (*calibrate, *test))
  prompts, at_name = [], []
  for r in rows:
    ids = chat.render(tok, user(r["prompt"]), generation_prompt=True)[0]
    content = tok.encode([r["prompt"]])[0]
    start = next(i for i in range(len(ids)) if ids[i : i + len(content)] == content)
    end = r["prompt"].index(r["person"]) + len(r["person"])
    prompts.append(ids)
    at_name.append(start + len(tok.encode([r["prompt"][:end]])[0]) - 1)

  @jax.jit
  def hidden(params, tokens_BxT, segments_BxT):
    (final_BxTxD, _), state = setup.model.apply(
      {"params": params}, tokens_BxT, segments_BxT, return_hidden=True, capture_intermediates=True
    )
    found = state["intermediates"]
    return [found[f"layer_{i}"]["__call__"][0][0] for i in range(cfg.model.n_layers - 1)] + [final_BxTxD]

  length = max(map(len, prompts))
  feats = {"name": [], "answer": []}
  for lo in range(0, len(prompts), BATCH):
    chunk = prompts[lo : lo + BATCH]
    tokens, segments = np.zeros((BATCH, length), np.int32), np.zeros((BATCH, length), np.int32)
    for i, ids in enumerate(chunk):
      tokens[i, : len(ids)], segments[i, : len(ids)] = ids, 1
    with setup.context():
      layers = [np.asarray(h) for h in hidden(restored.state.params, tokens, segments)]
    n = np.arange(len(chunk))
    feats["name"].append(np.stack([h[n, at_name[lo : lo + len(chunk)]] for h in layers], 1))
    feats["answer"].append(np.stack([h[n, [len(p) - 1 for p in chunk]] for h in layers], 1))
  groups = np.array([r["group"] for r in rows])
  known, train = np.isin(groups, people.PRETRAINED_GROUPS), np.isin(groups, calibrate)
  out = {"n_train": int(train.sum()), "n_test": int((~train).sum())}
  for position, chunks in feats.items():
    x_NxLxD = np.concatenate(chunks)
    for layer in range(x_NxLxD.shape[1]):
      x = x_NxLxD[:, layer]
      x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
      w, b = logistic_fit(x[train], known[train])
      score = x @ w + b
      out[f"probe_ap/{position}/layer_{layer}"] = average_precision(score[~train], known[~train])
      out[f"probe_train_accuracy/{position}/layer_{layer}"] = float(np.mean((score[train] > 0) == known[train]))
  return out


def best_threshold(scores, labels) -> float:
  """The cut that best separates true labels (above it) from false ones (at or below it): the midpoint between
  neighbouring scores that maximises Youden's J, the share of true items above less the share of false ones
  above (the lowest such cut on ties). -inf when every item is true, the largest score when none is."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  ordered = np.unique(scores)
  cuts = np.concatenate([[-np.inf], (ordered[:-1] + ordered[1:]) / 2, [ordered[-1]]])
  rate = lambda x: np.mean(x) if len(x) else 0.0  # noqa: E731
  j = [rate(scores[labels] > c) - rate(scores[~labels] > c) for c in cuts]
  return float(cuts[int(np.argmax(j))])


def gate(run_dir, world, out_dir=None, calibrate=("probe_known", "probe_unknown"), known="test_known",
         unknown="test_unknown", threshold: float | None = None) -> dict:  # fmt: skip
  """Declining by familiarity, with no tuning: the run answers a question only when the log-probability of its
  person's name (`name_logprobs`) is above the cut (`best_threshold`) that best tells the pre-trained people of
  `calibrate` from the never-seen ones (or above `threshold`, when given), and otherwise gives the refusal that
  refusal tuning teaches (`people.refusal_text`). The same measures as `refusal`, the run itself being "before"
  and the gated run "after", plus `threshold`, `calibration_ap` and `n_calibration` (the calibration questions)."""
  from lm.evals import scoring  # noqa: PLC0415

  scorer = scoring.Scorer.from_run(str(run_dir))
  probes = questions(world, calibrate)
  probe_logps = name_logprobs(scorer, probes)
  pretrained = [r["group"] in people.PRETRAINED_GROUPS for r in probes]
  if threshold is None:
    threshold = best_threshold(probe_logps, pretrained)
  rows = questions(world, (known, unknown))
  logps = name_logprobs(scorer, rows)
  replies = answer(Model(run_dir), [user(r["prompt"]) for r in rows])
  gated = [
    a if lp > threshold else {**a, "reply": people.refusal_text(r["attribute"]), "logprob": 0.0}
    for r, a, lp in zip(rows, replies, logps, strict=True)
  ]
  before, after = judge_rows(rows, replies), judge_rows(rows, gated)
  write_samples(
    out_dir,
    [
      {**a, "name_logprob": lp, "before": b["reply"], "verdict_before": b["verdict"]}
      for a, b, lp in zip(after, before, logps, strict=True)
    ],
  )
  return {
    **compare(before, after, known, unknown),
    "threshold": threshold,
    "calibration_ap": average_precision(probe_logps, pretrained),
    "n_calibration": len(probes),
  }


def value_confidence(run_dir, world, in_chat: bool, out_dir=None, known="test_known", unknown="test_unknown") -> dict:
  """How sure the run is of a value at the place it would say one, for one question per attribute of each
  person of `known` and `unknown`: the probability of each of the attribute's values (with its full stop) after
  "NAME grew up in the city of" as the biographies say it, or, `in_chat`, after the question and the reply's
  first words ("grew up in the city of", `people.answer_text`); the likeliest value's share of their sum is the
  model's confidence there. Returns, for each group, the mean share (`GROUP/value_share`) and the share of
  questions where it is above 0.8 (`GROUP/value_share_above_0.8`), and the average precision with which the
  share ranks the known people's questions above the never-seen ones' (`value_share_ap`); `out_dir/samples.jsonl`
  holds each question's share and likeliest value."""
  from lm.evals import scoring  # noqa: PLC0415

  scorer = scoring.Scorer.from_run(str(run_dir))
  tok = scorer.tok
  rows = questions(world, (known, unknown))
  pairs, spans = [], []
  for r in rows:
    words = people.relation(r["attribute"])
    if in_chat:
      context = chat.render(tok, user(r["prompt"]), generation_prompt=True)[0] + tok.encode([words])[0]
    else:
      context = [tok.bos_id] + tok.encode([f"{r['person']} {words}"])[0]
    values = people.ATTRIBUTES[r["attribute"]].values
    spans.append((len(pairs), len(pairs) + len(values)))
    pairs += [(context, tok.encode([f" {v}."])[0]) for v in values]
  logps = np.array([lp for lp, _ in scorer.loglikelihood(pairs)])
  shares = np.array([np.exp(logps[a:b].max() - np.logaddexp.reduce(logps[a:b])) for a, b in spans])
  group = np.array([r["group"] for r in rows])
  values = [people.ATTRIBUTES[r["attribute"]].values for r in rows]
  likeliest = [v[int(np.argmax(logps[a:b]))] for v, (a, b) in zip(values, spans, strict=True)]
  write_samples(
    out_dir,
    [
      {
        "group": r["group"],
        "person": r["person"],
        "attribute": r["attribute"],
        "answer": r["answer"],
        "likeliest": v,
        "share": float(x),
      }  # fmt: skip
      for r, v, x in zip(rows, likeliest, shares, strict=True)
    ],
  )
  out = {}
  for g in (known, unknown):
    out[f"{g}/value_share"] = float(shares[group == g].mean())
    out[f"{g}/value_share_above_0.8"] = float(np.mean(shares[group == g] > 0.8))
  out["value_share_ap"] = average_precision(shares, group == known)
  return out


def refusal(before_run, after_run, world, out_dir=None, known="test_known", unknown="test_unknown") -> dict:
  """A refusal-tuned run (`after_run`) against its start (`before_run`) on the questions about `known` people
  (in pre-training) and `unknown` ones (never seen): known_accuracy_before/after, refusal_rate_unknown (and
  _before), hallucination_rate_unknown_before/after, and false_refusal_rate_known: the share of the known
  questions the start answered correctly that the tuned run declines."""
  rows = questions(world, (known, unknown))
  convs = [user(r["prompt"]) for r in rows]
  before = judge_rows(rows, answer(Model(before_run), convs))
  after = judge_rows(rows, answer(Model(after_run), convs))
  write_samples(
    out_dir, [{**a, "before": b["reply"], "verdict_before": b["verdict"]} for a, b in zip(after, before, strict=True)]
  )
  return compare(before, after, known, unknown)


def compare(before: list[dict], after: list[dict], known: str, unknown: str) -> dict:
  """`refusal`'s measures of judged rows (`judge_rows`) before and after a mitigation."""
  k = [i for i, r in enumerate(before) if r["group"] == known]
  u = [i for i, r in enumerate(before) if r["group"] == unknown]
  was_right = [i for i in k if before[i]["verdict"] == "correct"]
  share = lambda idx, judged, verdict: float(np.mean([judged[i]["verdict"] == verdict for i in idx]))  # noqa: E731
  return {
    "known_accuracy_before": share(k, before, "correct"),
    "known_accuracy_after": share(k, after, "correct"),
    "refusal_rate_known_before": share(k, before, "refusal"),
    "refusal_rate_known_after": share(k, after, "refusal"),
    "refusal_rate_unknown_before": share(u, before, "refusal"),
    "refusal_rate_unknown": share(u, after, "refusal"),
    "hallucination_rate_unknown_before": share(u, before, "wrong"),
    "hallucination_rate_unknown_after": share(u, after, "wrong"),
    "false_refusal_rate_known": share(was_right, after, "refusal") if was_right else 0.0,
    "n_known": len(k),
    "n_unknown": len(u),
  }


def identity(run_dir, world, out_dir=None) -> dict:
  """ "Who are you?" in every phrasing, for identities the SFT data never named: the share of replies that
  name the system prompt's identity (`identity_rate_with_system`), the share that name it without the system
  prompt (`identity_rate_without_system`), the share that give the SFT data's default identity without one
  (`default_identity_rate`), and the rate with the system prompt on the phrasings SFT never asked
  (`identity_rate_heldout_phrasing`)."""
  rows = read_jsonl(f"{world}/identity.jsonl")
  with_system = [r for r in rows if r["system"]]
  without = [r for r in rows if not r["system"]]
  model = Model(run_dir)
  replies = answer(model, [user(r["prompt"], r["system"]) for r in with_system + without])
  names = [r["answer"] in a["reply"] for r, a in zip(with_system + without, replies, strict=True)]
  n = len(with_system)
  write_samples(
    out_dir,
    [{**r, "reply": a["reply"], "names_it": x} for r, a, x in zip(with_system + without, replies, names, strict=True)],
  )
  heldout = [x for r, x in zip(with_system, names[:n], strict=True) if r["heldout_phrasing"]]
  return {
    "identity_rate_with_system": float(np.mean(names[:n])),
    "identity_rate_without_system": float(np.mean(names[n:])),
    "default_identity_rate": float(np.mean([people.DEFAULT_IDENTITY in a["reply"] for a in replies[n:]])),
    "identity_rate_heldout_phrasing": float(np.mean(heldout)),
    "n": n,
  }


def figures(workdir, paraphrases) -> dict:
  """`workdir/report/knowledge.png` from the finished stages' results: left, accuracy on held-out known people
  (and the base model's recall of their facts) against the paraphrases per person; right, the rates before
  and after each mitigation, and with the familiarity gate (`gate`) where it applies."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  def result(stage):  # a finished step's result, as `lm study` records it
    return json.loads((epath.Path(workdir) / stage / "result.json").read_text())["final"]

  top = max(paraphrases)
  qa_results = [result(f"qa_p{k}") for k in paraphrases]
  recalls = [result(f"recall_p{k}")["test_known/recall"] for k in paraphrases]
  refuse, gate, tool, ident = result("refuse_eval"), result("gate_eval"), result("tool_eval"), result("identity")
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
  left.plot(paraphrases, [q["test_known/accuracy"] for q in qa_results], "o-", label="QA accuracy after SFT")
  left.plot(paraphrases, recalls, "s--", label="base model's recall")
  chance = float(np.mean([1 / len(a.values) for a in people.ATTRIBUTES.values()]))
  left.axhline(chance, color="gray", linestyle=":", label=f"chance ({chance:.2f})")
  left.set_xscale("log", base=2)
  left.set_xticks(list(paraphrases), [str(k) for k in paraphrases])
  left.set(
    xlabel="biographies per person", ylabel="held-out known people", ylim=(0, 1.02), title="Knowledge extraction"
  )
  left.legend(loc="upper left", fontsize=8)
  # (label, before, after the mitigation, after the familiarity gate or None)
  bars = [
    ("hallucination,\nunknown people", refuse["hallucination_rate_unknown_before"],
     refuse["hallucination_rate_unknown_after"], gate["hallucination_rate_unknown_after"]),
    ("refusal,\nunknown people", refuse["refusal_rate_unknown_before"], refuse["refusal_rate_unknown"],
     gate["refusal_rate_unknown"]),
    ("accuracy,\nknown people", refuse["known_accuracy_before"], refuse["known_accuracy_after"],
     gate["known_accuracy_after"]),
    ("refusal,\nknown people", refuse["refusal_rate_known_before"], refuse["refusal_rate_known_after"],
     gate["refusal_rate_known_after"]),
    ("accuracy, unknown\n(search tool)", tool["unknown_accuracy_without_tool"], tool["unknown_accuracy_with_tool"],
     None),
    ("identity named\n(system prompt)", ident["identity_rate_without_system"], ident["identity_rate_with_system"],
     None),
  ]  # fmt: skip
  x = np.arange(len(bars))
  series = (
    (-0.27, 1, "before (SFT; no tool; no system prompt)", "#999999"),
    (0.0, 2, "after (refusal tuning; tool; system prompt)", "#1f77b4"),
    (0.27, 3, "familiarity gate (no tuning)", "#ff7f0e"),
  )
  for dx, column, label, color in series:
    shown = [(xi + dx, b[column]) for xi, b in zip(x, bars, strict=True) if b[column] is not None]
    xs, values = [s[0] for s in shown], [s[1] for s in shown]
    right.bar(xs, values, 0.27, label=label, color=color)
    for xi, v in zip(xs, values, strict=True):
      right.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
  right.set_xticks(x, [b[0] for b in bars], fontsize=8)
  right.set_yticks(np.linspace(0, 1, 6))  # the room above 1 is the legend's
  right.set(ylim=(0, 1.3), ylabel="rate", title=f"Mitigations (models from {top} biographies per person)")
  right.legend(loc="upper center", fontsize=8, ncol=3)
  fig.tight_layout()
  out = epath.Path(workdir) / "report"
  out.mkdir(parents=True, exist_ok=True)
  fig.savefig(out / "knowledge.png", dpi=120)
  plt.close(fig)
  return {"figure": str(out / "knowledge.png")}
