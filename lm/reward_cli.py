"""`lm reward --workdir DIR --file F.jsonl`: scores conversations and preference pairs with a reward-model run.

Each line of F is a record in `lm.data.post`'s forms: a conversation `{"messages": [...]}`, or a preference
pair (`{"prompt", "chosen", "rejected"}` or `{"chosen", "rejected"}` as whole conversations). For each record,
in order, one JSON line goes to stdout:
  a conversation: {"reward": R, "truncated": BOOL}
  a pair:         {"chosen": R_CHOSEN, "rejected": R_REJECTED, "truncated": BOOL}
R is the reward the run's newest checkpoint gives the conversation (for a pair, the prompt followed by each
response), read at its last token as in training (`lm.objectives.reward`). A sequence longer than the run's
`data.seq_len` is cut to its first `data.seq_len` tokens, as training cuts it, and `truncated` says so. A bad
record is a one-line error naming F:LINE, before anything is printed.
"""

import json
import os

import jax
import numpy as np

from lm import chat, partitioning
from lm import workdir as workdir_lib
from lm.data import pipeline, post, sources
from lm.errors import UserError
from lm.objectives.reward import rewards


def read(path: str, tok) -> list[tuple[str, list[list[int]]]]:
  """(kind "conversation" or "pair", its sequences' ids) of every record of the JSONL file `path`."""
  if not os.path.isfile(path):
    raise UserError(f"--file {path} is not a file")
  out = []
  for where, value in sources.jsonl_records([path]):
    record = post.Record(where, value)
    if isinstance(value, dict) and "messages" in value:
      out.append(("conversation", [chat.render(tok, post.conversation(record), "all")[0]]))
    else:
      p = post.pair(record)
      out.append(
        ("pair", [chat.render_continuation(tok, p.prompt, response)[0] for response in (p.chosen, p.rejected)])
      )
  return out


def main(args) -> None:
  """`lm reward`: prints one JSON line of rewards per record of `args.file`, scored by the run in `args.workdir`."""
  cfg, tok = workdir_lib.load_run(args.workdir)
  if cfg.train.objective != "reward":
    raise UserError(f"{args.workdir} is a train.objective={cfg.train.objective} run, not a reward model (reward)")
  records = read(args.file, tok)
  _, _, setup, params = workdir_lib.load_params(args.workdir)
  length = cfg.data.seq_len + 1  # a row, as training packs it: seq_len inputs
  sequences = [ids[:length] for _, seqs in records for ids in seqs]
  parallel = partitioning.data_parallel_size(setup.mesh)
  rows = -(-max(1, cfg.train.batch_size // cfg.optim.grad_accum_steps) // parallel) * parallel
  sharding = partitioning.batch_sharding(setup.mesh)
  score = jax.jit(
    lambda params, batch: rewards(setup.model, params, batch),
    in_shardings=(setup.state_shardings.params, sharding),
    out_shardings=partitioning.replicated(setup.mesh),
  )
  empty = post.pack([], length)
  scores = []
  with setup.context():
    for lo in range(0, len(sequences), rows):
      packed = [
        post.pack([(np.asarray(ids, np.int32), np.ones(len(ids), np.float32))], length)
        for ids in sequences[lo : lo + rows]
      ]
      packed += [empty] * (rows - len(packed))
      batch = post.to_batch({k: np.stack([row[k] for row in packed]) for k in empty})
      scores += jax.device_get(score(params, pipeline.global_batch(batch, sharding))).tolist()[: len(sequences) - lo]
  at = 0
  for kind, seqs in records:
    values, at = scores[at : at + len(seqs)], at + len(seqs)
    truncated = any(len(ids) > cfg.data.seq_len for ids in seqs)
    if kind == "conversation":
      print(json.dumps({"reward": values[0], "truncated": truncated}))
    else:
      print(json.dumps({"chosen": values[0], "rejected": values[1], "truncated": truncated}))
