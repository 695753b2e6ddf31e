"""The post-training chain with reinforcement learning: instruct.py's stages, then PPO and GRPO.

  lm study --config experiments/instruct_rl.py --workdir runs/instruct

In the same workdir as `experiments/instruct.py`, its finished stages are skipped. Then:
  ppo        instruct_ppo.py: PPO from the SFT run against the reward model (rm), KL penalty 0.5 per nat
  ppo_eval   PPO's win rate over SFT (temperature 1, judged by the hidden rule) and its KL from SFT
  grpo       instruct_grpo.py: GRPO from the SFT run, reward 1 for a correct reply (a program checks it)
  grpo_eval  GRPO's greedy accuracy on the 500 held-out examples of eval.jsonl (SFT's is sft_eval's), on which
             the GRPO settings were chosen
  grpo_vs_sft_eval  the two, example by example: examples GRPO gained and lost against SFT, McNemar's exact p
  sft_test, grpo_test  greedy accuracy of SFT and GRPO on test.jsonl: 6,360 more held-out examples, none of
             eval.jsonl's, never used to choose a setting
  grpo_vs_sft  the final comparison: grpo_vs_sft_eval's measures on test.jsonl
  sft_sampled_eval, grpo_sampled_eval  held-out accuracy of SFT and GRPO sampled at temperature 1, the rollouts'
             temperature: 4 replies per example, each with its own seed
  frontier   reward-model score against KL from SFT for every checkpoint of ppo, grpo and dpo (frontier.png)
runs/instruct/report/report.json adds ppo_win_rate, ppo_kl, grpo_accuracy (eval.jsonl), sft_accuracy_test,
grpo_accuracy_test, grpo_gained, grpo_lost, grpo_vs_sft_p (test.jsonl), the same three on eval.jsonl
(grpo_gained_eval, ...), sft_accuracy_sampled and grpo_accuracy_sampled to instruct.py's numbers.
"""

import os

from lm.config import load_module
from lm.evals import instruct

HERE = os.path.dirname(os.path.abspath(__file__))
CHAIN = load_module(os.path.join(HERE, "instruct.py"))


def get_study(workdir):
  world, examples, tests = f"{workdir}/world", f"{workdir}/world/eval.jsonl", f"{workdir}/world/test.jsonl"
  prompts = {
    "data.post_source": f"jsonl:{world}/prompts_train.jsonl",
    "data.post_eval_source": f"jsonl:{world}/eval.jsonl",
  }

  def ppo_eval(d):
    win = instruct.win_rate(f"{workdir}/ppo", f"{workdir}/sft", examples, out_dir=d)
    at = instruct.reward_and_kl(f"{workdir}/ppo", f"{workdir}/sft", f"{workdir}/rm", examples)
    return {**win, "kl": at["kl"], "reward": at["reward"]}

  def sampled_accuracy(run, d):  # at the rollouts' temperature, 4 replies per held-out example
    return instruct.chat_accuracy(f"{workdir}/{run}", examples, out_dir=d, temperature=1.0, samples=4)

  runs = {"PPO": f"{workdir}/ppo", "GRPO": f"{workdir}/grpo", "DPO": f"{workdir}/dpo"}
  return [
    *CHAIN.get_study(workdir),
    {
      "id": "ppo",
      "config": "instruct_ppo.py",
      "init_from": "sft",
      "overrides": {**prompts, "rl.reward_model": f"{workdir}/rm"},
    },
    {"id": "ppo_eval", "run": ppo_eval},
    {"id": "grpo", "config": "instruct_grpo.py", "init_from": "sft", "overrides": prompts},
    {"id": "grpo_eval", "run": lambda d: instruct.chat_accuracy(f"{workdir}/grpo", examples, out_dir=d)},
    {"id": "grpo_vs_sft_eval", "run": lambda d: instruct.paired(f"{workdir}/sft_eval", f"{workdir}/grpo_eval")},
    {"id": "sft_test", "run": lambda d: instruct.chat_accuracy(f"{workdir}/sft", tests, out_dir=d)},
    {"id": "grpo_test", "run": lambda d: instruct.chat_accuracy(f"{workdir}/grpo", tests, out_dir=d)},
    {"id": "grpo_vs_sft", "run": lambda d: instruct.paired(f"{workdir}/sft_test", f"{workdir}/grpo_test")},
    {"id": "sft_sampled_eval", "run": lambda d: sampled_accuracy("sft", d)},
    {"id": "grpo_sampled_eval", "run": lambda d: sampled_accuracy("grpo", d)},
    {
      "id": "frontier",
      "run": lambda d: {
        label: points[-1]
        for label, points in instruct.frontier(runs, f"{workdir}/sft", f"{workdir}/rm", examples, d).items()
      },
    },
  ]


def get_report(results):
  return {
    **CHAIN.get_report(results),
    "ppo_win_rate": results["ppo_eval"]["win_rate"],
    "ppo_kl": results["ppo_eval"]["kl"],
    "grpo_accuracy": results["grpo_eval"]["accuracy"],
    "grpo_gained_eval": results["grpo_vs_sft_eval"]["gained"],
    "grpo_lost_eval": results["grpo_vs_sft_eval"]["lost"],
    "grpo_vs_sft_p_eval": results["grpo_vs_sft_eval"]["p_value"],
    "sft_accuracy_test": results["sft_test"]["accuracy"],
    "grpo_accuracy_test": results["grpo_test"]["accuracy"],
    "grpo_gained": results["grpo_vs_sft"]["gained"],
    "grpo_lost": results["grpo_vs_sft"]["lost"],
    "grpo_vs_sft_p": results["grpo_vs_sft"]["p_value"],
    "sft_accuracy_sampled": results["sft_sampled_eval"]["accuracy"],
    "grpo_accuracy_sampled": results["grpo_sampled_eval"]["accuracy"],
  }
