"""The knowledge study's refusal chain on a world with a long tail: people pre-training mentions only once.

  lm study --config experiments/knowledge_tail.py --workdir runs/knowledge_tail

In experiments/knowledge.py's world every pre-trained person is read hundreds of times, so nothing in
pre-training rewards knowing whether a name has been read: a name's facts always follow from it. Here
pre-training also reads 16,000 people once each (`passing`, one biography each, never asked about), whose
facts cannot be predicted, so the next-token loss itself rewards telling a known name from a stranger.
The 175 known people's 64 biographies are written 3 times over, so that the file holds about a run's
tokens (4.8M of 4.9M) and the run reads each passing person once; the known people get 2/3 of the tokens.

Stages, as in knowledge.py for K = 64 only: world, base_p64, recall_p64, sft_p64, qa_p64, calibration (is the
base, or the SFT model, sure of a value only for people it read?), interrogate, probe, refuse, refuse_eval and
gate_eval. The tool and identity stages do not depend on the tail and are left out.
"""

import os

from lm.config import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
STUDY = load_module(os.path.join(HERE, "knowledge.py"))

PASSING = 16_000
REPEATS = 3
STAGES = (
  "world", "base_p64", "recall_p64", "sft_p64", "qa_p64", "calibration", "interrogate", "probe", "refuse",
  "refuse_eval", "gate_eval",
)  # fmt: skip


def get_study(workdir, passing=PASSING, repeats=REPEATS, sizes=None):
  stages = STUDY.get_study(workdir, paraphrases=(64,), sizes={"passing": passing, **(sizes or {})}, repeats=repeats)
  return [s for s in stages if s["id"] in STAGES]


def get_report(results):
  return {"recall_p64": results["recall_p64"]["test_known/recall"], **STUDY.refusal_report(results)}
