r"""Data preparation preset for source code: line-length, alphanumeric-fraction and auto-generated-marker heuristics
(`lm.data.prepare.CodeFilter`), exact and MinHash deduplication. Gopher's prose rules are not used: they remove
nearly all code (measured in README).

  lm data prepare --config experiments/data_code.py --out runs/prepared_code
  lm train --config experiments/quickstart.py --workdir runs/q_code \
    --config.data.source='jsonl:runs/prepared_code/output/*'
"""

from lm.config import default_config


def get_config():
  c = default_config()
  c.prepare.source = "stdlib"
  c.prepare.preset = "code"
  c.prepare.code.max_line_length = 1000
  c.prepare.code.max_mean_line_length = 100.0
  c.prepare.code.min_alnum_fraction = 0.25
  c.prepare.code.min_lines = 3
  c.data.source = "jsonl:runs/prepared_code/output/*"
  return c
