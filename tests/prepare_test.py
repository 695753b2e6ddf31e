"""`lm data prepare` on corpora with known answers: injected exact and near duplicates, junk, contamination."""

import json
import os
import re
import stat

import numpy as np
import pytest

from lm.data import prepare, prepare_report

from conftest import run_lm, write_experiment

STOP = ("the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "it", "for")


def words_pool(rng, n: int = 3000) -> list[str]:
  letters = "abcdefghijklmnopqrstuvwxyz"
  return ["".join(rng.choice(list(letters), rng.integers(3, 9))) for _ in range(n)]


def prose(rng, pool, paragraphs: int = 3) -> str:
  """A document that reads like prose to the filters: sentences of 8-16 words with stop words, paragraphs."""
  out = []
  for _ in range(paragraphs):
    sentences = []
    for _ in range(rng.integers(4, 7)):
      words = [
        pool[i] if rng.random() > 0.3 else STOP[rng.integers(len(STOP))]
        for i in rng.integers(0, len(pool), rng.integers(8, 17))
      ]
      sentences.append(" ".join(words).capitalize() + ".")
    out.append(" ".join(sentences))
  return "\n\n".join(out)


def shingles(text: str, n: int = 5) -> set:
  words = re.findall(r"\w+", text.lower())
  return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
  x, y = shingles(a), shingles(b)
  return len(x & y) / len(x | y)


def perturb(rng, text: str, pool, rate: float) -> str:
  """`text` with a fraction `rate` of its words replaced by others (a sentence's final period stays)."""
  tokens = text.split(" ")
  for i in np.flatnonzero(rng.random(len(tokens)) < rate):
    tokens[i] = pool[rng.integers(len(pool))] + tokens[i][len(tokens[i].rstrip(".\n")) :]
  return " ".join(tokens)


JUNK = {
  "short": lambda rng, pool: "Buy cheap pills now. Best price.",
  "repeated_lines": lambda rng, pool: "\n".join(["Click here to subscribe to the newsletter today."] * 40),
  "symbols": lambda rng, pool: " ".join("#### $$$ ... !!! @@@ %%% &&& *** ~~~".split() * 30),
  "no_stop_words": lambda rng, pool: ". ".join(" ".join(pool[i] for i in rng.integers(0, 200, 12)) for _ in range(12)),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(path of a JSON-lines corpus, its ground truth): 300 unique documents, 30 exact duplicates of the first 30
  (lower-cased, whitespace changed), 90 near-duplicates at measured Jaccard similarities, 5 junk documents of 4 kinds, 3
  contaminated documents; and an evaluation set."""
  root = tmp_path_factory.mktemp("prep")
  rng = np.random.default_rng(0)
  pool = words_pool(rng)
  unique = [prose(rng, pool) for _ in range(300)]
  records, truth = [], {"unique": [], "exact": [], "near": [], "junk": {}, "contaminated": []}
  for i, text in enumerate(unique):
    records.append({"id": f"u{i}", "text": text})
    truth["unique"].append(f"u{i}")
  for i in range(30):
    records.append({"id": f"x{i}", "text": "  " + unique[i].lower().replace(" ", "   ") + "\n"})
    truth["exact"].append(f"x{i}")
  for i in range(90):
    source = 100 + i
    text = perturb(rng, unique[source], pool, [0.005, 0.01, 0.015, 0.02, 0.025, 0.04, 0.08, 0.3, 0.5][i % 9])
    records.append({"id": f"n{i}", "text": text})
    truth["near"].append((f"n{i}", f"u{source}", jaccard(text, unique[source])))
    truth["unchanged"] = truth.get("unchanged", 0) + (text == unique[source])  # no word drawn: an exact copy
  for kind, make in JUNK.items():
    for j in range(5):
      records.append({"id": f"j_{kind}_{j}", "text": make(rng, pool)})
      truth["junk"].setdefault(kind, []).append(f"j_{kind}_{j}")
  eval_text = prose(rng, pool, paragraphs=2)
  (root / "eval.txt").write_text(eval_text)
  leaked = " ".join(eval_text.split()[20:40])  # 20 words of the evaluation set
  for i in range(3):
    records.append({"id": f"c{i}", "text": prose(rng, pool) + "\n\n" + leaked.capitalize() + "."})
    truth["contaminated"].append(f"c{i}")
  order = rng.permutation(len(records))
  with open(root / "corpus.jsonl", "w") as f:
    f.writelines(json.dumps(records[i]) + "\n" for i in order)
  return root, truth


@pytest.fixture(scope="module")
def prepared(corpus):
  root, truth = corpus
  experiment = write_experiment(
    root / "exp.py",
    **{
      "prepare.source": f"jsonl:{root / 'corpus.jsonl'}",
      "prepare.preset": "prose",
      "prepare.decontaminate": (f"evalset=text:{root / 'eval.txt'}",),
    },
  )
  out = root / "out"
  result = run_lm("data", "prepare", "--config", experiment, "--out", str(out), "--no-progress")
  kept = {r["id"] for path in sorted((out / "output").glob("*")) for r in prepare.read_jsonl(str(path))}
  removed = {}
  for folder in (out / "removed").iterdir():
    for path in folder.glob("*"):
      for r in prepare.read_jsonl(str(path)):
        removed[r["id"]] = (folder.name, r.get("metadata", {}))
  return out, truth, kept, removed, result


def test_near_duplicates_exact_duplicates_and_junk_are_removed_and_unique_documents_kept(prepared):
  out, truth, kept, removed, _ = prepared
  # Every document is in exactly one place: kept, or one removal folder.
  assert not kept & set(removed) and len(kept) + len(removed) == 300 + 30 + 90 + 20 + 3
  # Of each exact pair one copy stays (whichever came first) and the other is an exact duplicate.
  for i, copy in enumerate(truth["exact"]):
    pair = (copy, f"u{i}")
    assert sum(d in kept for d in pair) == 1 and [removed[d][0] for d in pair if d in removed] == ["exact_duplicate"]
  similar = [(near, source) for near, source, j in truth["near"] if j >= 0.8]
  dissimilar = [(near, source) for near, source, j in truth["near"] if j < 0.3]
  assert len(similar) >= 30 and len(dissimilar) >= 10
  caught = sum(not (near in kept and source in kept) for near, source in similar)
  assert caught >= 0.95 * len(similar)
  assert all(near in kept for near, _ in dissimilar)  # a third or half the words changed: not a duplicate
  originals = truth["unique"][30:100] + truth["unique"][190:]  # neither copied nor perturbed
  lost = [u for u in originals if u not in kept]
  assert len(lost) <= 0.01 * len(originals), [(u, removed.get(u)) for u in lost]
  for kind, ids in truth["junk"].items():
    assert not set(ids) & kept, kind
  assert removed[truth["junk"]["repeated_lines"][0]][0] == "gopher_repetition"
  assert removed[truth["junk"]["no_stop_words"][0]][0] == "gopher_quality"
  for i in truth["contaminated"]:
    folder, metadata = removed[i]
    assert folder == "contamination" and metadata["contaminated_by"] == "evalset"
    assert len(metadata["contaminated_ngram"].split()) == 13


def test_the_report_accounts_for_every_document(prepared):
  out, truth, kept, removed, result = prepared
  report = json.loads((out / "report" / "report.json").read_text())
  assert report["docs_in"] == len(kept) + len(removed) and report["docs_out"] == len(kept)
  assert sum(report["removed"].values()) == len(removed)
  assert report["removed_by_stage"]["exact_duplicate"] == 30 + truth["unchanged"]
  assert report["removed_by_stage"]["contamination"] == 3
  for stage in report["stages"]:
    assert stage["in"]["documents"] == stage["out"]["documents"] + stage["removed"]["documents"]
  assert report["stages"][-1]["out"]["bytes"] == report["bytes_out"] > 0
  assert max(map(int, report["cluster_sizes"])) >= 2  # near-duplicate clusters of two or more (JSON keys)
  assert any(t["step"] == "Gopher Repetition" and t["docs_per_s"] for t in report["throughput"])
  # Samples of every reason, quoted from the removed documents themselves.
  assert set(report["samples"]) == set(report["removed"])
  assert all(s["id"] in removed and s["text"] for samples in report["samples"].values() for s in samples)
  md = (out / "report" / "report.md").read_text()
  assert "Removed, by reason" in md and "exact_duplicate" in md
  assert os.path.getsize(out / "report" / "removed.png") > 10_000
  assert result.returncode == 0 and '"docs_out"' in result.stdout


def test_training_reads_the_prepared_documents_and_records_them(prepared, tmp_path):
  from lm import config as config_lib
  from lm import train
  from lm.data import sources

  from conftest import tiny_config

  out, _, kept, _, _ = prepared
  cfg = config_lib.default_config()
  cfg.data.source = f"jsonl:{out}/output/*"
  ids = {identity.removeprefix("id:") for identity, _ in sources.identified_documents(cfg)}
  assert ids == kept
  # A run on them says which prepared directory, under which prepare.* config, it trained on.
  run_cfg = tiny_config(**{"data.source": cfg.data.source, "train.steps": 2, "data.cache_dir": str(tmp_path / "c")})
  train.train(run_cfg, str(tmp_path / "run"), progress=False)
  record = json.loads((tmp_path / "run" / "prepared_data.json").read_text())
  assert record["directory"] == str(out) and record["prepare"]["preset"] == "prose"
  assert record["report"]["docs_out"] == len(kept) and len(record["files"]) == 2


def test_the_code_preset_keeps_source_files_and_removes_generated_minified_and_binary_ones(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  stdlib = os.path.dirname(os.__file__)
  names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:40]
  for name in names:
    (src / name).write_text(open(os.path.join(stdlib, name), encoding="utf-8", errors="replace").read())
  (src / "zz_minified.py").write_text("x=1;" * 2000 + "\n" + "y=2\n" * 3)
  (src / "zz_generated.py").write_text("# Auto-generated by protoc. DO NOT EDIT.\nimport sys\n\nX = 1\n")
  (src / "zz_table.py").write_text("\n".join(["|-+-|-+-|-+-|-+-|-+-|"] * 50))
  exp = write_experiment(tmp_path / "exp.py", **{"prepare.source": f"text:{src}/*.py", "prepare.preset": "code"})
  out = tmp_path / "out"
  assert run_lm("data", "prepare", "--config", exp, "--out", str(out), "--no-progress").returncode == 0
  report = json.loads((out / "report" / "report.json").read_text())
  assert report["removed"].get("code_long_line", 0) + report["removed"].get("code_mean_line_length", 0) >= 1
  assert report["removed"]["code_autogenerated"] >= 1 and report["removed"]["code_alnum_fraction"] >= 1
  removed = [r["id"] for p in (out / "removed" / "code").glob("*") for r in prepare.read_jsonl(str(p))]
  assert {"zz_minified.py", "zz_generated.py", "zz_table.py"} <= set(removed)
  assert report["docs_out"] >= 0.8 * len(names)  # real source files pass


def test_bad_keys_are_one_line_errors(tmp_path):
  exp = write_experiment(tmp_path / "exp.py", **{"prepare.preset": "poetry"})
  result = run_lm("data", "prepare", "--config", exp, "--out", str(tmp_path / "o"), check=False)
  assert result.returncode == 2 and "prepare.preset" in result.stderr


def test_slurm_submits_one_array_job_per_stage_each_after_the_previous(tmp_path, monkeypatch):
  # No Slurm here: a stand-in `sbatch` records the scripts datatrove would submit and answers with a job id.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  sbatch = bin_dir / "sbatch"
  sbatch.write_text(
    "#!/bin/sh\n"
    f"n=$(ls {tmp_path}/submitted | wc -l)\n"
    f'for last; do :; done; cp "$last" {tmp_path}/submitted/$n.slurm; echo "$@" > {tmp_path}/submitted/$n.args\n'
    'echo "Submitted batch job $((1000 + n))"\n'
  )
  sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
  (tmp_path / "submitted").mkdir()
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  (tmp_path / "a.txt").write_text("hello world")
  exp = write_experiment(
    tmp_path / "exp.py",
    **{"prepare.source": f"text:{tmp_path}/*.txt", "prepare.slurm.partition": "cpu-long", "prepare.tasks": 4},
  )
  out = tmp_path / "out"
  result = run_lm("data", "prepare", "--config", exp, "--out", str(out), "--executor", "slurm")
  assert result.returncode == 0 and "submitted" in result.stdout
  submitted = sorted((tmp_path / "submitted").glob("*.slurm"), key=lambda p: int(p.stem))
  # Each stage is an array job, then a one-task job that merges its tasks' stats once it is done.
  jobs = [(int(p.stem), p.read_text(), (tmp_path / "submitted" / f"{p.stem}.args").read_text()) for p in submitted]
  stages = [(n, text, args) for n, text, args in jobs if "launch_pickled_pipeline" in text]
  merges = [(n, text, args) for n, text, args in jobs if "merge_stats" in text]
  names = [re.search(r"--job-name=(\S+)", text).group(1) for _, text, _ in stages]
  assert names == [f"lm_prepare_{s}" for s in prepare_report.STAGES] and len(merges) == len(stages)
  first = stages[0][1]
  assert "#SBATCH --partition=cpu-long" in first and "#SBATCH --array=0-3" in first
  assert str(out / "logs" / "filter") in first and "--dependency" not in stages[0][2]
  for (before, _, _), (_, _, args) in zip(stages, stages[1:], strict=False):
    assert f"--dependency=afterok:{1000 + before}" in args  # each stage waits for the one before
  assert "#SBATCH --array=0-13" in stages[5][1]  # one task per MinHash bucket
  assert all("#SBATCH --array" not in text or "--array=0-0" in text for _, text, _ in merges)


def test_ray_runs_the_same_pipeline_to_the_same_documents(corpus, tmp_path):
  # The filters and exact deduplication (the MinHash stages' 14 bucket tasks would only add Ray start-ups).
  import ray

  root, _ = corpus
  exp = write_experiment(tmp_path / "exp.py", **{"prepare.source": f"jsonl:{root / 'corpus.jsonl'}"})
  small = ["--config.prepare.minhash=False", "--config.prepare.limit=200", "--no-progress"]
  kept = {}
  for executor in ("local", "ray"):
    out = tmp_path / executor
    if executor == "ray":
      ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
      args = ("data", "prepare", "--config", exp, "--out", str(out), "--executor", executor)
      assert run_lm(*args, *small).returncode == 0
    finally:
      if executor == "ray":
        ray.shutdown()
    kept[executor] = {r["id"] for path in sorted((out / "output").glob("*")) for r in prepare.read_jsonl(str(path))}
  assert kept["ray"] == kept["local"] and 100 < len(kept["local"]) < 200


def test_the_url_filter_works_offline_and_passes_documents_without_a_url():
  from datatrove.data import Document

  url_filter = prepare.OfflineURLFilter()  # datatrove's bundled block lists, tldextract's bundled suffix list
  assert url_filter.filter(Document(text="x", id="a", metadata={"url": "http://0-1sex.com/page"})) == (False, "domain")
  assert url_filter.filter(Document(text="x", id="b", metadata={"url": "https://docs.python.org/3/"})) is True
  assert url_filter.filter(Document(text="x", id="c", metadata={})) is True


def test_parquet_sources_keep_their_ids_and_urls(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  table = pa.table({"id": ["p1", "p2", "p3"], "text": ["alpha beta", "", "gamma delta"], "url": ["u1", "u2", "u3"]})
  pq.write_table(table, tmp_path / "part-0.parquet")
  got = list(prepare.read_source(f"parquet:{tmp_path}/*.parquet"))
  assert got == [("p1", "alpha beta", {"url": "u1"}), ("p3", "gamma delta", {"url": "u3"})]  # the empty one skipped
  exp = write_experiment(
    tmp_path / "exp.py",
    **{
      "prepare.source": f"parquet:{tmp_path}/*.parquet",
      "prepare.preset": "none",
      "prepare.compression": "none",
      "prepare.exact_dedup": False,
      "prepare.minhash": False,
    },
  )
  assert run_lm("data", "prepare", "--config", exp, "--out", str(tmp_path / "o"), "--no-progress").returncode == 0
  records = [r for p in sorted((tmp_path / "o" / "output").glob("*.jsonl")) for r in prepare.read_jsonl(str(p))]
  assert sorted((r["id"], r["text"], r["metadata"]["url"]) for r in records) == [
    ("p1", "alpha beta", "u1"),
    ("p3", "gamma delta", "u3"),
  ]
