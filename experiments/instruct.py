"""The post-training chain on a laptop: pre-train, SFT, reward model and DPO, each checked by a program.

  lm study --config experiments/instruct.py --workdir runs/instruct

Stages, each in runs/instruct/<id>/ (finished ones are skipped when the command runs again):
  world      the generated instruction world (lm/worlds/instructions.py, seed 0): pre-training text, SFT
             conversations, preference pairs and 500 held-out examples
  base       instruct_base.py: a byte-level 4-layer model pre-trained on the plain Q/A text
  base_eval  exact-match accuracy of the base model prompted with the chat template (greedy)
  base_plain_eval  the same asked as its pre-training text asks, `Q: <prompt>\nA:` (what it knows)
  sft        instruct_sft.py: full fine-tuning on the conversations, loss on the assistant's tokens
  sft_eval   the same accuracy after SFT
  rm         instruct_rm.py: a reward model from the SFT run, Bradley-Terry on the pairs
  rm_eval    its accuracy on held-out pairs
  dpo        instruct_dpo.py: DPO from the SFT run on the same pairs
  dpo_eval   DPO's win rate over its SFT start (sampled replies, judged by the world's hidden rule)
runs/instruct/report/report.json holds base_accuracy, base_plain_accuracy, sft_accuracy, rm_eval_accuracy and
dpo_win_rate.
"""

from lm.evals import instruct
from lm.worlds import instructions


def get_study(workdir):
  world = f"{workdir}/world"

  def data(kind, split):
    return f"jsonl:{world}/{kind}_{split}.jsonl"

  posts = {
    "sft": {"data.post_source": data("sft", "train"), "data.post_eval_source": data("sft", "eval")},
    "prefs": {"data.post_source": data("prefs", "train"), "data.post_eval_source": data("prefs", "eval")},
  }
  examples = f"{world}/eval.jsonl"
  pairs = f"{world}/prefs_eval.jsonl"
  return [
    {"id": "world", "run": lambda d: {k: str(v) for k, v in instructions.write_world(d, seed=0).items()}},
    {"id": "base", "config": "instruct_base.py", "overrides": {"data.source": f"jsonl:{world}/pretrain.jsonl"}},
    {"id": "base_eval", "run": lambda d: instruct.chat_accuracy(f"{workdir}/base", examples, out_dir=d)},
    {
      "id": "base_plain_eval",
      "run": lambda d: instruct.chat_accuracy(f"{workdir}/base", examples, out_dir=d, prompt_format="plain"),
    },
    {"id": "sft", "config": "instruct_sft.py", "init_from": "base", "overrides": posts["sft"]},
    {"id": "sft_eval", "run": lambda d: instruct.chat_accuracy(f"{workdir}/sft", examples, out_dir=d)},
    {"id": "rm", "config": "instruct_rm.py", "init_from": "sft", "overrides": posts["prefs"]},
    {"id": "rm_eval", "run": lambda d: instruct.reward_accuracy(f"{workdir}/rm", pairs, out_dir=d)},
    {"id": "dpo", "config": "instruct_dpo.py", "init_from": "sft", "overrides": posts["prefs"]},
    {
      "id": "dpo_eval",
      "run": lambda d: instruct.win_rate(f"{workdir}/dpo", f"{workdir}/sft", examples, out_dir=d),
    },
  ]


def get_report(results):
  return {
    "base_accuracy": results["base_eval"]["accuracy"],
    "base_plain_accuracy": results["base_plain_eval"]["accuracy"],
    "sft_accuracy": results["sft_eval"]["accuracy"],
    "rm_eval_accuracy": results["rm_eval"]["accuracy"],
    "dpo_win_rate": results["dpo_eval"]["win_rate"],
  }
