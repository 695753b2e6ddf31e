"""The report of `lm data prepare`: what went in, what came out, what each stage removed and why.

Counted from the files themselves (DIR/output/ and every DIR/removed/REASON/), so nothing is estimated: a
document is either kept or in exactly one removal folder. Documents flow through the stages in order
(`stage_order`), so each stage's input is its output plus what it removed. Throughput per pipeline step is
from datatrove's own stats (DIR/logs/STAGE/stats.json: time summed over the step's tasks).

Writes DIR/report/report.json (`docs_in`, `docs_out`, `removed` {reason: documents}, per-stage counts of
documents, bytes and tokens, throughput, duplicate-cluster sizes, samples of removed documents),
report.md and removed.png. Tokens are counted with `prepare.tokenizer` (a tokenizer or run directory) if set,
else they are words (`lm.data.prepare.WORD`).
"""

import collections
import glob
import json
import os

import ml_collections

from lm.data import prepare as prepare_lib

FILTER_FOLDERS = {  # preset -> the removal folders of its filters, in pipeline order
  "prose": ("url", "gopher_repetition", "gopher_quality", "fineweb_quality"),
  "code": ("code",),
  "none": (),
}


def stage_order(cfg: ml_collections.ConfigDict) -> list[str]:
  """The removal folders of the configured pipeline, in the order documents meet them."""
  p = cfg.prepare
  order = list(FILTER_FOLDERS[p.preset])
  order += ["exact_duplicate"] if p.exact_dedup else []
  order += ["near_duplicate"] if p.minhash else []
  order += ["contamination"] if p.decontaminate else []
  return order


def _counter(cfg):
  """text -> tokens: the tokenizer of `prepare.tokenizer`, or a word count."""
  if cfg.prepare.tokenizer:
    from lm import tokenizer as tokenizer_lib  # noqa: PLC0415

    tok = tokenizer_lib.load_tokenizer(cfg.prepare.tokenizer)
    return lambda text: sum(len(ids) for ids in tok.encode(text.splitlines(keepends=True) or [""]))
  return lambda text: len(prepare_lib.WORD.findall(text))


def _scan(folder: str, count_tokens, samples: int) -> dict:
  """Documents, bytes, tokens, removal reasons (the filter's, else the folder's name) and the first `samples`
  documents of each reason, of the JSONL files in `folder`."""
  out = {"documents": 0, "bytes": 0, "tokens": 0, "reasons": collections.Counter(), "samples": {}, "clusters": []}
  for path in sorted(glob.glob(os.path.join(folder, "*.jsonl*"))):
    for record in prepare_lib.read_jsonl(path):
      text, metadata = record["text"], record.get("metadata") or {}
      out["documents"] += 1
      out["bytes"] += len(text.encode())
      out["tokens"] += count_tokens(text)
      reason = metadata.get("filter_reason") or os.path.basename(folder)
      out["reasons"][reason] += 1
      if metadata.get("minhash_cluster_size", 1) > 1:
        out["clusters"].append(metadata["minhash_cluster_size"])
      if len(out["samples"].setdefault(reason, [])) < samples:
        shown = {k: v for k, v in metadata.items() if k != "filter_reason"}
        out["samples"][reason].append({"id": record.get("id"), "text": text[:400], **shown})
  return out


STAGES = (  # lm.data.prepare.stages' names, in order
  "filter",
  "exact_signatures",
  "exact_find",
  "exact_filter",
  "minhash_signatures",
  "minhash_buckets",
  "minhash_cluster",
  "final",
)


def _throughput(out: str) -> list[dict]:
  """Per pipeline step of every stage, in order: documents and million characters per second of the step's
  own time (summed over its tasks; datatrove's doc_len counts characters)."""
  rows = []
  paths = glob.glob(os.path.join(out, "logs", "*", "stats.json"))
  rank = {name: i for i, name in enumerate(STAGES)}
  for stats_path in sorted(paths, key=lambda p: rank.get(os.path.basename(os.path.dirname(p)), len(rank))):
    stage = os.path.basename(os.path.dirname(stats_path))
    with open(stats_path) as f:
      for step in json.load(f):
        seconds = _total(step.get("time_stats", 0))
        stats = step["stats"]
        docs, chars = _total(stats.get("total", stats.get("documents", 0))), _total(stats.get("doc_len", 0))
        name = step["name"].split(": ", 1)[-1].encode("ascii", "ignore").decode().strip()
        rows.append(
          {
            "stage": stage,
            "step": name,
            "seconds": seconds,
            "documents": docs,
            "docs_per_s": docs / seconds if seconds and docs else None,
            "mchars_per_s": chars / 1e6 / seconds if seconds and chars else None,
          }
        )
  return rows


def _total(value) -> float:
  """A datatrove stat: a number, or a summary dict whose `total` is the number."""
  return value.get("total", 0) if isinstance(value, dict) else value


def write(out: str, cfg: ml_collections.ConfigDict, wall_s: float | None = None) -> dict:
  """Writes DIR/report/ for the prepared directory `out`; returns report.json's contents."""
  p = cfg.prepare
  count_tokens = _counter(cfg)
  kept = _scan(os.path.join(out, "output"), count_tokens, 0)
  removed = {
    name: _scan(os.path.join(out, "removed", name), count_tokens, p.samples_per_reason) for name in stage_order(cfg)
  }
  unit = "tokens" if p.tokenizer else "words"
  # Walk the stages backwards: a stage's input is its output plus what it removed.
  stages, flow = [], {k: kept[k] for k in ("documents", "bytes", "tokens")}
  for name in reversed(stage_order(cfg)):
    r = removed[name]
    before = {k: flow[k] + r[k] for k in flow}
    stages.append({"stage": name, "in": before, "removed": {k: r[k] for k in flow}, "out": dict(flow)})
    flow = before
  stages.reverse()
  reasons = collections.Counter()
  for r in removed.values():
    reasons.update(r["reasons"])
  clusters = removed.get("near_duplicate", {"clusters": []})["clusters"] + kept["clusters"]
  report = {
    "source": p.source,
    "preset": p.preset,
    "docs_in": flow["documents"],
    "docs_out": kept["documents"],
    "bytes_in": flow["bytes"],
    "bytes_out": kept["bytes"],
    f"{unit}_in": flow["tokens"],
    f"{unit}_out": kept["tokens"],
    "removed": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    "removed_by_stage": {name: r["documents"] for name, r in removed.items()},
    "stages": stages,
    "token_unit": unit,
    # Each member of a cluster of k documents (kept or removed) carries k: k of them make one cluster.
    "cluster_sizes": {size: n // size for size, n in sorted(collections.Counter(clusters).items())},
    "throughput": _throughput(out),
    "samples": {reason: sample for r in removed.values() for reason, sample in r["samples"].items()},
    "wall_s": wall_s,
  }
  os.makedirs(os.path.join(out, "report"), exist_ok=True)
  with open(os.path.join(out, "report", "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(out, "report", "report.md"), "w") as f:
    f.write(markdown(report))
  figure(report, os.path.join(out, "report", "removed.png"))
  return report


def markdown(r: dict) -> str:
  unit = r["token_unit"]
  mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
  lines = [
    f"# Data preparation: {r['source']} ({r['preset']} preset)",
    "",
    f"Kept {r['docs_out']:,} of {r['docs_in']:,} documents ({mb(r['bytes_out'])} of {mb(r['bytes_in'])}, "
    f"{r[unit + '_out']:,} of {r[unit + '_in']:,} {unit})" + (f" in {r['wall_s']:.1f} s." if r["wall_s"] else "."),
    "",
    f"| stage | documents in | removed | out | bytes in | bytes out | {unit} in | {unit} out |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for s in r["stages"]:
    i, rm, o = s["in"], s["removed"], s["out"]
    lines.append(
      f"| {s['stage']} | {i['documents']:,} | {rm['documents']:,} | {o['documents']:,} | {mb(i['bytes'])} | "
      f"{mb(o['bytes'])} | {i['tokens']:,} | {o['tokens']:,} |"
    )
  lines += ["", "## Removed, by reason", "", "| reason | documents |", "|---|---|"]
  lines += [f"| {reason} | {n:,} |" for reason, n in r["removed"].items()]
  if r["cluster_sizes"]:
    lines += ["", "## Near-duplicate clusters (size: clusters)", ""]
    lines.append(", ".join(f"{size}: {n}" for size, n in r["cluster_sizes"].items()))
  lines += [
    "",
    "## Throughput (each step's own time, summed over tasks)",
    "",
    "| stage | step | documents | docs/s | M chars/s |",
  ]
  lines.append("|---|---|---|---|---|")
  for t in r["throughput"]:
    rate = f"{t['docs_per_s']:,.0f}" if t["docs_per_s"] else ""
    mbs = f"{t['mchars_per_s']:.2f}" if t["mchars_per_s"] else ""
    lines.append(f"| {t['stage']} | {t['step']} | {t['documents']:,} | {rate} | {mbs} |")
  lines += ["", "## Samples of removed documents, by reason", ""]
  for name, samples in r["samples"].items():
    for sample in samples:
      text = sample["text"].replace("\n", " ")[:300]
      extra = {k: v for k, v in sample.items() if k not in ("id", "text")}
      lines.append(f"- **{name}** `{sample['id']}` {extra if extra else ''}: {text}")
  return "\n".join(lines) + "\n"


def figure(r: dict, path: str) -> None:
  """Documents left after each stage, and documents removed per reason."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  names = ["input"] + [s["stage"] for s in r["stages"]]
  counts = [r["docs_in"]] + [s["out"]["documents"] for s in r["stages"]]
  left.bar(range(len(names)), counts, color="#4c72b0")
  left.set_xticks(range(len(names)), names, rotation=35, ha="right")
  left.set_ylabel("documents kept")
  left.set_title("documents after each stage")
  reasons = list(r["removed"].items())[:15][::-1]
  right.barh([k for k, _ in reasons], [v for _, v in reasons], color="#dd8452")
  right.set_xlabel("documents removed")
  right.set_title("removed, by reason")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
