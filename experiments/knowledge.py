"""What a model knows, and what it does when it does not: the knowledge and hallucination study on a laptop.

  lm study --config experiments/knowledge.py --workdir runs/knowledge

Stages, each in runs/knowledge/<id>/ (finished ones are skipped when the command runs again):
  world         the people world (lm/worlds/people.py, seed 0): biographies, QA, tool traces, identity questions
  base_pK       knowledge_base.py on K biographies per person (K in PARAPHRASES), the same tokens for every K
  recall_pK     does the base model complete "NAME was born in" with the fact?
  sft_pK        knowledge_sft.py from base_pK: QA on the sft people, identity conversations
  qa_pK         accuracy on people held out from SFT (knowledge extraction) and hallucination on never-seen people
  calibration   how sure base_pK and sft_pK (K the largest) are of a value where they would say one, in a
                biography's words and in a reply: does the share of the likeliest value tell known people
                from never-seen ones? (knowledge.value_confidence)
  interrogate   self-interrogation of sft_pK (K the largest): sampled answers checked against the world, the
                confidence's average precision, and an SFT set that declines where the model was wrong or unsure
  probe         linear probes of sft_pK's hidden states at the name and where the answer starts: is "I have read
                this name" readable there? (trained on the probe groups, average precision on the test groups)
  refuse        knowledge_sft.py from sft_pK on that set (R-Tuning)
  refuse_eval   before and after: accuracy on known people, refusal on unknown ones, false refusals (on the
                test groups; probes/...: the same on the probe groups, whose questions it was tuned on)
  gate_eval     the other way to decline, with no tuning: sft_pK answers only when the name's log-probability is
                above a cut set on the probe groups (knowledge.gate), on the test groups
  tool          knowledge_sft.py from sft_pK on traces that search the world's records before every answer
  tool_eval     accuracy on never-seen people with the search tool, without it, and with the record pasted in
  identity      "Who are you?" with and without a system prompt naming an identity (sft_pK)
  figures       report/knowledge.png: the rates before and after each mitigation, accuracy against K
runs/knowledge/report/report.json holds the headline numbers (`get_report`).
"""

import os

from lm.evals import knowledge
from lm.worlds import people

HERE = os.path.dirname(os.path.abspath(__file__))
BASE, SFT = (
  os.path.join(HERE, "knowledge_base.py"),
  os.path.join(HERE, "knowledge_sft.py"),
)  # a wrapper may live elsewhere

PARAPHRASES = (1, 8, 64)
SEARCH = "search=jsonl:{world}/records.jsonl"


def get_study(workdir, paraphrases=PARAPHRASES, sizes=None, repeats=1):
  """The stages; `paraphrases`, `sizes` (people per group, `people.DEFAULT_SIZES`) and `repeats` (of the
  biographies in each pre-training file, `people.pretraining_documents`) scale the world."""
  world = f"{workdir}/world"
  top = max(paraphrases)
  final = f"{workdir}/sft_p{top}"
  stages = [
    {
      "id": "world",
      "run": lambda d: people.write_world(d, seed=0, sizes=sizes, paraphrases=paraphrases, repeats=repeats),
    }
  ]
  for k in paraphrases:
    stages += [
      {"id": f"base_p{k}", "config": BASE, "overrides": {"data.source": f"jsonl:{world}/pretrain_p{k}.jsonl"}},
      {"id": f"recall_p{k}", "run": lambda d, k=k: knowledge.recall(f"{workdir}/base_p{k}", world, out_dir=d)},
      {
        "id": f"sft_p{k}",
        "config": SFT,
        "init_from": f"base_p{k}",
        "overrides": {"data.post_source": f"jsonl:{world}/sft_train.jsonl"},
      },
      {"id": f"qa_p{k}", "run": lambda d, k=k: knowledge.qa(f"{workdir}/sft_p{k}", world, out_dir=d)},
    ]
  search = SEARCH.format(world=world)

  def tool_eval(d):
    run = f"{workdir}/tool"
    with_tool = knowledge.qa(run, world, ("test_unknown",), out_dir=f"{d}/with_tool", tool=search)
    without = knowledge.qa(run, world, ("test_unknown",), out_dir=f"{d}/without_tool")
    pasted = knowledge.qa(run, world, ("test_unknown",), out_dir=f"{d}/in_context", in_context=True)
    return {
      "unknown_accuracy_with_tool": with_tool["test_unknown/accuracy"],
      "tool_calls": with_tool["tool_calls"],
      "unknown_accuracy_without_tool": without["test_unknown/accuracy"],
      "unknown_hallucination_without_tool": without["test_unknown/hallucination"],
      "in_context_accuracy": pasted["test_unknown/accuracy"],
    }

  def refuse_eval(d):
    test = knowledge.refusal(final, f"{workdir}/refuse", world, out_dir=d)
    probed = knowledge.refusal(final, f"{workdir}/refuse", world, f"{d}/probes", "probe_known", "probe_unknown")
    return {**test, **{f"probes/{k}": v for k, v in probed.items()}}  # the people it was tuned on

  def calibration(d):
    out = {}
    for run, in_chat, key in ((f"base_p{top}", False, "base_text"), (f"sft_p{top}", True, "sft_chat")):
      result = knowledge.value_confidence(f"{workdir}/{run}", world, in_chat, out_dir=f"{d}/{key}")
      out.update({f"{key}/{k}": v for k, v in result.items()})
    return out

  stages += [
    {"id": "calibration", "run": calibration},
    {"id": "interrogate", "run": lambda d: knowledge.interrogate(final, world, d)},
    {"id": "probe", "run": lambda d: knowledge.probe(final, world)},
    {
      "id": "refuse",
      "config": SFT,
      "init_from": f"sft_p{top}",
      "overrides": {"data.post_source": f"jsonl:{workdir}/interrogate/refusal_train.jsonl", "train.steps": 150},
    },
    {"id": "refuse_eval", "run": refuse_eval},
    {"id": "gate_eval", "run": lambda d: knowledge.gate(final, world, d)},
    {
      "id": "tool",
      "config": SFT,
      "init_from": f"sft_p{top}",
      # 900 steps at lr 1e-3 searched through the tool as well as 1,800 at the SFT's 5e-4 did, in half the time
      "overrides": {
        "data.post_source": f"jsonl:{world}/tool_train.jsonl",
        "train.steps": 900,
        "optim.lr": 1e-3,
        "train.checkpoint_every": 300,
      },
    },
    {"id": "tool_eval", "run": tool_eval},
    {"id": "identity", "run": lambda d: knowledge.identity(final, world, out_dir=d)},
    {"id": "figures", "run": lambda d: knowledge.figures(workdir, paraphrases)},
  ]
  return stages


def refusal_report(results):
  """The report's numbers from the stages the refusal chain shares with experiments/knowledge_tail.py: the answers of
  sft_pK (K the largest), its calibration, interrogation, probes, refusal tuning and gate."""
  top = max(int(k.removeprefix("qa_p")) for k in results if k.startswith("qa_p"))
  refuse, gate, interrogate = results["refuse_eval"], results["gate_eval"], results["interrogate"]
  return {
    "known_accuracy_augmented": results[f"qa_p{top}"]["test_known/accuracy"],
    "hallucination_rate_unknown": results[f"qa_p{top}"]["test_unknown/hallucination"],
    "refusal_rate_unknown": refuse["refusal_rate_unknown"],
    "false_refusal_rate_known": refuse["false_refusal_rate_known"],
    "refusal_rate_unknown_probes": refuse["probes/refusal_rate_unknown"],
    "false_refusal_rate_known_probes": refuse["probes/false_refusal_rate_known"],
    "known_accuracy_before": refuse["known_accuracy_before"],
    "known_accuracy_after": refuse["known_accuracy_after"],
    "gate_refusal_rate_unknown": gate["refusal_rate_unknown"],
    "gate_false_refusal_rate_known": gate["false_refusal_rate_known"],
    "gate_known_accuracy_after": gate["known_accuracy_after"],
    "confidence_ap": interrogate["confidence_ap"],
    "value_share_ap_base": results["calibration"]["base_text/value_share_ap"],
    "value_share_ap_sft": results["calibration"]["sft_chat/value_share_ap"],
    "name_familiarity_ap": interrogate["name_familiarity_ap"],
    "name_probe_ap": max(v for k, v in results["probe"].items() if k.startswith("probe_ap/name/")),
    "answer_probe_ap": max(v for k, v in results["probe"].items() if k.startswith("probe_ap/answer/")),
  }


def get_report(results):
  paraphrases = sorted(int(k.removeprefix("qa_p")) for k in results if k.startswith("qa_p"))
  tool, ident = results["tool_eval"], results["identity"]
  return {
    "known_accuracy_single": results[f"qa_p{min(paraphrases)}"]["test_known/accuracy"],
    **refusal_report(results),
    "unknown_accuracy_with_tool": tool["unknown_accuracy_with_tool"],
    "unknown_accuracy_without_tool": tool["unknown_accuracy_without_tool"],
    "in_context_accuracy": tool["in_context_accuracy"],
    "identity_rate_with_system": ident["identity_rate_with_system"],
    "identity_rate_without_system": ident["identity_rate_without_system"],
    **{f"known_accuracy_p{k}": results[f"qa_p{k}"]["test_known/accuracy"] for k in paraphrases},
    **{f"recall_p{k}": results[f"recall_p{k}"]["test_known/recall"] for k in paraphrases},
  }
