"""The `lm` command. Every user-caused error is one line on stderr and exit status 2.

lm train --config FILE --workdir DIR [--config.KEY=VALUE ...]
lm plot DIR [DIR ...] [--out DIR]
lm bench train [--preset ref] [--config.KEY=VALUE ...]
lm sample --workdir DIR --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P ...]
lm bench sample [--preset ref] [--new-tokens 512] [--peer PYTHON];  lm bench rl [--preset ref] [--steps ROLLOUTS]
lm bench moe [--preset ref | --config FILE] [--experts 8]   (a dense model against its MoE twin of equal active params)
lm bench hf [--workdir RUN]   (a SmolLM-135M-shaped Llama through lm import hf / export hf, against transformers)
lm bench score --workdir RUN [--requests 2000]   (lm eval's scorer: requests packed into shared rows, and one a row)
lm chat --workdir DIR [--system TEXT] [--tool NAME=KIND:ARG] [--messages F|- --json] [decoding controls as lm sample]
lm reward --workdir DIR --file F.jsonl;  lm lora merge --workdir DIR --out DIR2
lm export hf --workdir DIR --out OUT [--step N] [--dtype bfloat16];  lm import hf --from PATH --workdir DIR
lm eval --workdir DIR --tasks T1,T2 [--shots K] [--limit N] [--chat] [--out F.json];  lm eval --list
lm study --config FILE --workdir DIR   (a chain of dependent runs and steps, then its report)
lm sweep --config FILE --workdir DIR [--print-commands]; lm scaling fit|plot|report ...; lm bench fit [--table CSV]
lm data prepare --config FILE --out DIR [--executor local|slurm|ray]   (clean, filter, dedup with datatrove; a report)
lm plan --config FILE --topology v5p:2x2x4 [--json]   (ahead-of-time compile for a TPU slice: memory, time, cost)
lm tokenizer train --source S --kind sentencepiece|byte [--vocab-size V] --out DIR [--max-bytes N]   (tokenizer.path)
lm tokenizer stats --source S [--tokenizer DIR ...] [--train KIND[:VOCAB] ...] [--max-bytes N] [--json]
lm tokenize (--workdir DIR | --tokenizer DIR) (TEXT | --file F) [--json] [--html OUT]   (pieces and ids)
"""

import argparse
import json
import logging
import os
import sys
import traceback

from lm import distributed, eval_cli, plan, tokenizer_cli
from lm.errors import UserError
from lm.scaling import cli as scaling_cli

# Benchmarks whose model is not a config's: --config and its overrides would be ignored, so they are refused.
FIXED_BENCHES = {
  "score": "scores with the run's own config (--workdir)",
  "hf": "times a model of SmolLM-135M's shapes, built in the benchmark",
}


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      item = arg[len("--config.") :]
      if "=" not in item:
        if i + 1 >= len(argv):
          raise UserError(f"{arg} needs a value")
        item, i = f"{item}={argv[i + 1]}", i + 1
      overrides.append(item)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(f"{self.prog}: {message}")


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
  """The decoding controls `lm sample` and `lm chat` share."""
  p.add_argument("--max-new-tokens", type=int, default=None, help="default: 128, or half the context if less")
  p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1)")
  p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set reaching p; 1 is off")
  p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
  p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style, on every seen token; 1 is off")
  p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted once per occurrence; 0 is off")
  p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop at this string (repeatable)")
  p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
  p.add_argument("--num-samples", type=int, default=1, help="completions of the prompt, decoded as one batch")
  p.add_argument("--json", action="store_true", help="print one JSON line: texts and per-token log-probs")


def make_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="lm", description="Train, evaluate and study language models.")
  parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("train", help="train or resume a run")
  p.add_argument("--config", required=True, help="experiment file defining get_config()")
  p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, plots")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  distributed.add_flags(p)

  p = sub.add_parser("plot", help="overlay the loss curves of runs")
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--out", default=None, help="output directory (default: DIR/plots of the first run)")

  p = sub.add_parser("bench", help="benchmarks that print one JSON line")
  p.add_argument("what", choices=["train", "sample", "matmul", "fit", "data", "rl", "hf", "moe", "score"])
  p.add_argument("--preset", default="ref", help="model preset (default: ref)")
  p.add_argument("--steps", type=int, default=10, help="timed steps (rl: rollouts)")
  p.add_argument("--config", default=None, help="benchmark this experiment's model instead of a preset")
  p.add_argument(
    "--peer", default=None, metavar="PYTHON", help="also run the peer with this interpreter (matmul: one with torch)"
  )
  p.add_argument(
    "--peer-script",
    default=None,
    help="the peer script (default: ../shared/peers/torch_llama.py for train, hf_generate.py for sample)",
  )
  p.add_argument("--profile", action="store_true", help="add where a step's time goes, by op (sample: at batch 8)")
  p.add_argument("--no-bf16", action="store_true", help="train: skip the bf16-compute run beside f32")
  p.add_argument("--no-bare", action="store_true", help="train: skip the bare jax.numpy step (lm.bare) beside it")
  p.add_argument("--new-tokens", type=int, default=512, help="sample: tokens generated per row")
  p.add_argument("--experts", type=int, default=8, help="moe: experts of the dense model's MoE twin")
  p.add_argument(
    "--workdir",
    default=None,
    help="data: use this run's tokenizer (default: the config's, trained); hf: also export it; score: the run",
  )
  p.add_argument("--batches", type=int, default=200, help="data: batches timed per pipeline")
  p.add_argument("--requests", type=int, default=2000, help="score: log-likelihood requests timed")
  p.add_argument("--table", default=None, help=f"fit: the table to fit (default: {scaling_cli.DEFAULT_BENCH_TABLE})")

  p = sub.add_parser("sample", help="complete a prompt with a trained run, streaming the text")
  p.add_argument("--workdir", required=True, help="run directory: its newest checkpoint and its tokenizer")
  prompt = p.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="the text to complete")
  prompt.add_argument("--prompt-file", help="read the prompt from this file")
  add_decoding_flags(p)
  p.add_argument("--truncate", choices=["none", "left"], default="none", help="left: keep a long prompt's end")
  p = sub.add_parser("chat", help="talk to a run in the terminal, or reply once to messages as JSON")
  p.add_argument("--workdir", required=True, help="run directory: its newest checkpoint and its tokenizer")
  p.add_argument("--system", default=None, help="a system prompt that opens the conversation")
  p.add_argument("--messages", default=None, metavar="F|-", help="one-shot: a JSON list of messages (file or stdin)")
  p.add_argument(
    "--tool", action="append", default=[], metavar="NAME=KIND:ARG", help="offer a tool, e.g. search=jsonl:records.jsonl"
  )
  p.add_argument("--max-tool-calls", type=int, default=3, help="tool calls per reply before the model must answer")
  add_decoding_flags(p)

  p = sub.add_parser("reward", help="score conversations or pairs with a reward-model run; prints JSON lines")
  p.add_argument("--workdir", required=True, help="a run trained with train.objective=reward")
  p.add_argument("--file", required=True, help="JSONL of conversations or preference pairs")

  p = sub.add_parser("lora", help="LoRA runs")
  p.add_argument("what", choices=["merge"])
  p.add_argument("--workdir", required=True, help="a run trained with model.lora_rank > 0")
  p.add_argument("--out", required=True, help="a new run directory: the adapters folded into plain weights")

  p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face Llama model directory")
  p.add_argument("format", choices=["hf"])
  p.add_argument("--workdir", required=True, help="the run to export (its newest good checkpoint)")
  p.add_argument("--out", required=True, help="a new directory for transformers' from_pretrained")
  p.add_argument("--step", type=int, default=None, help="export this checkpoint instead of the newest")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the weights' dtype")
  p.add_argument("--max-shard-mb", type=int, default=5120, help="safetensors files at most this size (default 5 GiB)")
  p = sub.add_parser("import", help="turn a local Hugging Face Llama checkpoint into a run directory")
  p.add_argument("format", choices=["hf"])
  p.add_argument("--from", dest="source", required=True, help="config.json, safetensors, tokenizer.json")
  p.add_argument("--workdir", required=True, help="a new run directory")
  p.add_argument("--seq-len", type=int, default=None, help="the run's context (default: the model's, at most 2048)")
  p = sub.add_parser("study", help="run the stages of an experiment's get_study() in order, then its report")
  p.add_argument("--config", required=True, help="study file defining get_study(workdir) (and get_report)")
  p.add_argument("--workdir", required=True, help="study directory: one sub-directory per stage, report/")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  distributed.add_flags(p)
  p = sub.add_parser("data", help="data preparation: clean, filter, deduplicate a source with datatrove")
  data_sub = p.add_subparsers(dest="data_command", required=True)
  d = data_sub.add_parser("prepare", help="run an experiment file's prepare.* pipeline into --out, then its report")
  d.add_argument(
    "--config", required=True, help="experiment file (its get_config().prepare), e.g. experiments/data_prose.py"
  )
  d.add_argument("--out", required=True, help="output directory: output/, removed/REASON/, report/, logs/")
  d.add_argument("--executor", default="local", choices=["local", "slurm", "ray"], help="where the stages' tasks run")
  d.add_argument("--report-only", action="store_true", help="only (re)write the report of a finished --out")
  d.add_argument("--no-progress", action="store_true", help="no progress bars")
  eval_cli.add_parser(sub)
  scaling_cli.add_parsers(sub)
  plan.add_parser(sub)
  tokenizer_cli.add_parser(sub)
  return parser


def run(argv: list[str]) -> int:
  argv, overrides = split_overrides(argv)
  args = make_parser().parse_args(argv)
  if args.command == "train":
    from lm import config as config_lib  # noqa: PLC0415 (keeps `lm --help` fast)

    cfg = config_lib.load_config(args.config, overrides)  # config errors before any process waits for another
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.dist_timeout)
    from lm import train  # noqa: PLC0415

    final = train.train(cfg, args.workdir, progress=not args.no_progress)
    if not distributed.is_lead():
      return 0
    if "stopped_by" in final:
      print(
        f"stopped by {final['stopped_by']} after step {final['step']}: its checkpoint is saved and committed; "
        "rerun the same command to resume"
      )
      return 0
    shown = {k: round(v, 4) for k, v in final.items() if k in ("train/loss", "eval/loss", "eval/bpb", "tokens_per_s")}
    print(f"done at step {final['step']}: {shown}; outputs in {args.workdir}")
  elif args.command == "plot":
    from lm import plots  # noqa: PLC0415

    out = args.out or f"{args.workdirs[0]}/plots"
    for path in plots.plot_runs(args.workdirs, out):
      print(path)
  elif args.command == "plan":
    return plan.run(args, overrides)
  elif args.command in ("tokenizer", "tokenize"):
    return tokenizer_cli.run(args, overrides)
  elif args.command == "data":
    from lm import config as config_lib  # noqa: PLC0415
    from lm.data import prepare, prepare_report  # noqa: PLC0415

    cfg = config_lib.load_config(args.config, overrides)
    if args.report_only:
      summary = prepare_report.write(os.path.abspath(args.out), cfg)
    else:
      summary = prepare.prepare(cfg, args.out, args.executor, progress=not args.no_progress)
    keys = ("docs_in", "docs_out", "bytes_in", "bytes_out", "removed_by_stage", "wall_s", "submitted", "logs")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))
    if "docs_out" in summary:
      print(f"report: {os.path.join(args.out, 'report', 'report.md')}; documents: {os.path.join(args.out, 'output')}")
  elif args.command == "study":
    from lm import study  # noqa: PLC0415

    distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.dist_timeout)
    report = study.run_study(args.config, args.workdir, overrides, progress=not args.no_progress)
    if os.path.exists(report):
      print(report)
  elif args.command == "bench" and args.what in FIXED_BENCHES and (args.config or overrides):
    given = " ".join([*(["--config " + args.config] if args.config else []), *(f"--config.{o}" for o in overrides)])
    raise UserError(f"lm bench {args.what} {FIXED_BENCHES[args.what]}; it takes no {given}")
  elif args.command in ("sweep", "scaling") or (args.command == "bench" and args.what == "fit"):
    return scaling_cli.run(args, overrides)
  elif args.command == "bench" and args.what == "hf":
    from lm import bench_hf  # noqa: PLC0415

    print(json.dumps(bench_hf.main(args)))
  elif args.command == "bench":
    from lm import bench  # noqa: PLC0415

    bench.main(args, overrides)
  elif args.command == "chat":
    from lm import chat_cli  # noqa: PLC0415

    chat_cli.main(args)
  elif args.command == "reward":
    from lm import reward_cli  # noqa: PLC0415

    reward_cli.main(args)
  elif args.command == "lora":
    from lm import lora_cli  # noqa: PLC0415

    lora_cli.merge_run(args.workdir, args.out)
  elif args.command == "eval":
    eval_cli.main(args)
  elif args.command == "export":
    from lm import hf  # noqa: PLC0415

    done = hf.export_hf(args.workdir, args.out, args.step, args.dtype, args.max_shard_mb * 2**20)
    print(f"exported step {done['step']} of {args.workdir} ({done['params']:,} parameters) to {args.out}")
  elif args.command == "import":
    from lm import hf  # noqa: PLC0415

    done = hf.import_hf(args.source, args.workdir, overrides, args.seq_len)
    added = f"; appended {', '.join(done['added'])}" if done["added"] else ""
    shown = f"{done['params']:,} parameters, vocabulary {done['vocab']}{added}"
    print(f"imported {args.source} ({shown}) to {args.workdir}")
  elif args.command == "sample":
    from lm import sample_cli  # noqa: PLC0415

    sample_cli.main(args)
  return 0


def _run_multiprocess_aware(argv: list[str]) -> int:
  try:
    return run(argv)
  except BaseException as e:
    if not distributed.active() or isinstance(e, SystemExit):
      raise
    # One process of several: a normal exit would wait for peers stuck in a collective with this one.
    if not isinstance(e, UserError | KeyboardInterrupt):
      traceback.print_exc()
    status = 2 if isinstance(e, UserError) else 130 if isinstance(e, KeyboardInterrupt) else 1
    distributed.fail(str(e) or type(e).__name__, status)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.getLogger("absl").setLevel(logging.ERROR)  # tfds and orbax are chatty at WARNING
  try:
    return _run_multiprocess_aware(argv)
  except UserError as e:
    if "--debug" in argv:
      raise
    print(f"lm: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # training takes the first Ctrl-C itself; this is a second one, or another command
    if "--debug" in argv:
      raise
    print("lm: interrupted", file=sys.stderr)
    return 130
  except BrokenPipeError:  # `lm sample ... | head`: the reader has gone
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
    return 141


if __name__ == "__main__":
  sys.exit(main())
