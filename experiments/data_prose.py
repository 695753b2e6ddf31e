r"""Data preparation preset for prose: Gopher quality and repetition, FineWeb quality and URL filters, exact and
MinHash deduplication, decontamination against the held-out docstrings.

  lm data prepare --config experiments/data_prose.py --out runs/prepared_prose
  lm train --config experiments/quickstart.py --workdir runs/q_prose \
    --config.data.source='jsonl:runs/prepared_prose/output/*'

The default source is the standard library's docstrings (English prose, one document per file); point
`--config.prepare.source` at your own (`jsonl:GLOB`, `parquet:GLOB`, `text:GLOB`). README ("Data preparation") has
the measured report.
"""

from lm.config import default_config


def get_config():
  c = default_config()
  c.prepare.source = "stdlib_docstrings"
  c.prepare.preset = "prose"
  c.prepare.minhash_ngrams = 5
  c.prepare.minhash_buckets = 14
  c.prepare.minhash_hashes = 8
  c.prepare.decontaminate = ()  # e.g. ("docstrings=stdlib_docstrings",) removes documents quoting an eval set
  c.data.source = "jsonl:runs/prepared_prose/output/*"
  return c
