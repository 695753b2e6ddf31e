"""`lm tokenizer` and `lm tokenize`: tokenizers outside a run, trained, compared and looked at.

lm tokenizer train --source S --kind sentencepiece|byte [--vocab-size V] --out DIR [--max-bytes N]
lm tokenizer stats --source S [--tokenizer DIR ...] [--train KIND[:VOCAB] ...] [--max-bytes N] [--json]
lm tokenize (--workdir DIR | --tokenizer DIR) (TEXT | --file F|-) [--json] [--html OUT]

`--source` is written like `data.source`, and `--config.KEY=VALUE` overrides apply to the default config as in
`lm train` (data.text_field, data.eval_fraction, ...). A tokenizer is trained exactly as a new run trains its own
(`lm.workdir.train_new_tokenizer`): on up to `--max-bytes` (default tokenizer.train_bytes) of the source's train
split. `train` saves it as a workdir keeps it (`load_tokenizer(DIR)` reads it); a run copies it with
`tokenizer.path=DIR` instead of training one.

`stats` measures each tokenizer, in command-line order, on the source's held-out documents (its validation
split, the one runs evaluate on: data.eval_split, data.eval_fraction), at most `--max-bytes` of them, encoded a
batch of lines at a time:
- bytes_per_token: UTF-8 bytes of the text / its tokens;
- fallback_rate: the share of tokens that are byte-fallback pieces (<0xNN>) or unknown; 0 for the byte kind,
  whose bytes are its vocabulary;
- vocab_used: the share of the ids other than special tokens that occur at least once.

`tokenize` shows how a text splits (its ids, without <bos>/<eos>). A character whose UTF-8 bytes are spread
over several tokens (sentencepiece's byte fallback, or the byte kind on non-ASCII text) is shown, in the
terminal and as the HTML page's labels, as one `<0xNN>` per byte of each token that is not whole characters
alone. The JSON `pieces` and the HTML page's text are exact instead: each token's share of the decoded text,
a split character belonging to the token that holds its last byte (the others give ""), so that
"".join(pieces) is the text for lm's tokenizer kinds.
"""

import codecs
import html
import itertools
import json
import sys
import time

import ml_collections

from lm import config as config_lib
from lm.errors import UserError

TRAINED_KINDS = ("sentencepiece", "byte")
ENCODE_LINES = 1024  # lines per encode call: sentencepiece is several times slower on one long string
VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\x7f": "\u2421"}  # ␣ ↵ ⇥ ␡; other controls: U+2400 + c
TTY_BACKGROUNDS = ("\x1b[30;48;5;153m", "\x1b[30;48;5;223m")  # black on light blue, black on light orange
HTML_STYLE = """body { font-family: sans-serif; margin: 2em; }
pre { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; line-height: 1.7; }
.t0 { background: #cfe6ff; } .t1 { background: #ffdfb0; } .t0:hover, .t1:hover { outline: 1px solid #333; }
.t0[data-bytes]::before, .t1[data-bytes]::before { content: attr(data-bytes); color: #a33; font-size: 75%; }
.nl::before { content: "\\21b5"; color: #888; }"""


def add_parser(sub) -> None:
  """Adds `tokenizer train|stats` and `tokenize` to the `lm` subcommands."""
  p = sub.add_parser("tokenizer", help="train a tokenizer outside a run, or compare tokenizers on a corpus")
  what = p.add_subparsers(dest="tokenizer_command", metavar="train|stats", required=True, parser_class=type(p))
  t = what.add_parser("train", help="train a tokenizer as a run would and save it to a directory")
  t.add_argument("--source", required=True, help="the text, written like data.source: stdlib, text:GLOB, jsonl:GLOB")
  t.add_argument("--kind", choices=TRAINED_KINDS, default="sentencepiece")
  t.add_argument("--vocab-size", type=int, default=None, help="sentencepiece: ids, specials included (default 4096)")
  t.add_argument("--out", required=True, help="a new directory for tokenizer.json (and tokenizer.model)")
  t.add_argument("--max-bytes", type=int, metavar="N", help="train on at most N bytes (default tokenizer.train_bytes)")
  s = what.add_parser("stats", help="bytes per token, fallback rate and vocabulary use on held-out text")
  s.add_argument("--source", required=True, help="the corpus, written like data.source; its validation split is read")
  s.add_argument(
    "--tokenizer",
    dest="entries",
    action="append",
    type=lambda v: ("dir", v),
    metavar="DIR",
    help="a saved tokenizer, or a run's",
  )
  s.add_argument(
    "--train",
    dest="entries",
    action="append",
    type=lambda v: ("train", v),
    metavar="KIND[:VOCAB]",
    help="one trained on the train split, e.g. sentencepiece:4096 or byte",
  )
  s.add_argument(
    "--max-bytes",
    type=int,
    metavar="N",
    help="bytes trained on and bytes measured, each (default tokenizer.train_bytes)",
  )
  s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

  p = sub.add_parser("tokenize", help="show how a text splits into tokens: pieces and ids, JSON or an HTML page")
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--workdir", help="use this run's tokenizer")
  which.add_argument("--tokenizer", help="use this tokenizer directory (lm tokenizer train --out)")
  p.add_argument("text", nargs="?", default=None, help="the text (or --file)")
  p.add_argument("--file", default=None, metavar="F|-", help="read the text from this file, - for stdin")
  p.add_argument("--json", action="store_true", help='print {"ids": [...], "pieces": [...]}')
  p.add_argument("--html", default=None, metavar="OUT", help="write a page of the tokens, ids on hover")


def run(args, overrides: list[str]) -> int:
  """Runs a parsed `lm tokenizer ...` or `lm tokenize ...` command."""
  if args.command == "tokenize":
    if overrides:
      raise UserError("lm tokenize takes no --config.KEY=VALUE overrides")
    tokenize(args)
  elif args.tokenizer_command == "train":
    train(args, overrides)
  else:
    stats(args, overrides)
  return 0


def source_config(
  source: str, overrides: list[str], kind: str = "byte", vocab_size: int | None = None, max_bytes: int | None = None
) -> ml_collections.ConfigDict:
  """The default config with `overrides`, `data.source = source` and the tokenizer asked for, validated."""
  from lm.data import sources  # noqa: PLC0415

  cfg = config_lib.default_config()
  for item in overrides:
    config_lib.apply_override(cfg, item)
  sources.parse(source)  # a malformed source is an error even for the byte kind, which reads none
  cfg.data.source, cfg.tokenizer.kind = source, kind
  if vocab_size is not None:
    cfg.tokenizer.vocab_size = vocab_size
  if max_bytes is not None:
    if max_bytes <= 0:
      raise UserError(f"--max-bytes must be positive, got {max_bytes}")
    cfg.tokenizer.train_bytes = max_bytes
  config_lib.validate(cfg)
  return cfg


def train(args, overrides: list[str]) -> None:
  """`lm tokenizer train`: trains a tokenizer and saves it to `args.out`; prints one line."""
  from etils import epath  # noqa: PLC0415

  from lm import workdir as workdir_lib  # noqa: PLC0415

  out = epath.Path(args.out)
  if (out / "tokenizer.json").exists():
    raise UserError(f"--out {args.out} already holds a tokenizer (tokenizer.json): choose a new directory")
  cfg = source_config(args.source, overrides, args.kind, args.vocab_size, args.max_bytes)
  start = time.perf_counter()
  tok, trained_bytes = workdir_lib.train_new_tokenizer(cfg)
  seconds = time.perf_counter() - start
  try:
    tok.save(out)
  except OSError as e:
    raise UserError(f"cannot write the tokenizer to {args.out}: {e.strerror or e}") from None
  print(
    f"{tok.kind} tokenizer of {tok.vocab_size} tokens, trained on {trained_bytes:,} bytes of {args.source} "
    f"in {seconds:.1f} s: {args.out}"
  )


def stats(args, overrides: list[str]) -> None:
  """`lm tokenizer stats`: measures each tokenizer on held-out text; prints a table or one JSON object."""
  from lm import tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm import workdir as workdir_lib  # noqa: PLC0415

  if not args.entries:
    raise UserError("lm tokenizer stats needs at least one --tokenizer DIR or --train KIND[:VOCAB]")
  # Every entry is checked before the corpus is read.
  saved = {value: tokenizer_lib.load_tokenizer(value) for what, value in args.entries if what == "dir"}
  trained = {value: parse_train(value) for what, value in args.entries if what == "train"}
  cfg = source_config(args.source, overrides, max_bytes=args.max_bytes)
  lines = held_out_lines(cfg, cfg.tokenizer.train_bytes)
  rows = []
  for what, value in args.entries:
    if what == "dir":
      tok = saved[value]
    else:
      kind, vocab_size = trained[value]
      start = time.perf_counter()
      tok, trained_bytes = workdir_lib.train_new_tokenizer(
        source_config(args.source, overrides, kind, vocab_size, args.max_bytes)
      )
      took = time.perf_counter() - start
      print(f"lm tokenizer stats: trained {value} on {trained_bytes:,} bytes in {took:.1f} s", file=sys.stderr)
    rows.append({"name": value, **measure(tok, lines)})
  if args.json:
    print(json.dumps({"source": args.source, "tokenizers": rows}))
  else:
    print(format_table(rows, args.source, len(lines)))


def parse_train(value: str) -> tuple[str, int | None]:
  """(kind, vocab size) of a `--train KIND[:VOCAB]` entry; sentencepiece needs the vocab size."""
  kind, _, vocab = value.partition(":")
  if kind not in TRAINED_KINDS or (kind == "sentencepiece") != bool(vocab) or (vocab and not vocab.isdigit()):
    raise UserError(f"--train takes sentencepiece:VOCAB or byte, e.g. sentencepiece:4096, got {value!r}")
  return kind, int(vocab) if vocab else None


def held_out_lines(cfg, max_bytes: int) -> list[str]:
  """The lines (`lm.tokenizer.split_lines`) of the validation split of `data.source`, up to `max_bytes`."""
  from lm import tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm.data import corpus_builder  # noqa: PLC0415

  validation = corpus_builder.prepare(cfg)["validation"]
  lines = list(tokenizer_lib.training_sentences((validation[i] for i in range(len(validation))), max_bytes))
  if not lines:
    raise UserError(f"the validation split of {cfg.data.source!r} holds no text")
  return lines


def measure(tok, lines: list[str]) -> dict:
  """The stats of `tok` on `lines` (see the module docstring): {kind, vocab_size, bytes_per_token, ...}."""
  import numpy as np  # noqa: PLC0415

  counts = np.zeros(tok.vocab_size, np.int64)
  for start in range(0, len(lines), ENCODE_LINES):
    ids = np.fromiter(itertools.chain.from_iterable(tok.encode(lines[start : start + ENCODE_LINES])), np.int64)
    counts += np.bincount(ids, minlength=tok.vocab_size)
  text_ids = np.ones(tok.vocab_size, bool)
  text_ids[list(tok.special.values())] = False
  tokens, size = int(counts.sum()), sum(len(line.encode()) for line in lines)
  return {
    "kind": tok.kind,
    "vocab_size": tok.vocab_size,
    "bytes_per_token": size / tokens,
    "fallback_rate": int(counts[tok.fallback_mask()].sum()) / tokens,
    "vocab_used": int((counts[text_ids] > 0).sum()) / int(text_ids.sum()),
    "tokens": tokens,
    "bytes": size,
  }


def format_table(rows: list[dict], source: str, lines: int) -> str:
  """The rows of `stats` as an aligned table, under a line naming the text they were measured on."""
  header = ("tokenizer", "kind", "vocab", "bytes/token", "fallback", "vocab used", "tokens", "bytes")
  cells = [
    (
      r["name"],
      r["kind"],
      f"{r['vocab_size']:,}",
      f"{r['bytes_per_token']:.3f}",
      f"{r['fallback_rate']:.2%}",
      f"{r['vocab_used']:.1%}",
      f"{r['tokens']:,}",
      f"{r['bytes']:,}",
    )
    for r in rows
  ]
  widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

  def line(row) -> str:
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

  title = f"held-out text of {source}: {rows[0]['bytes']:,} bytes in {lines:,} lines (its validation split)"
  return "\n".join([title, line(header), *map(line, cells)])


def tokenize(args) -> None:
  """`lm tokenize`: prints the pieces and ids of a text, or its JSON, or writes its HTML page."""
  from lm import tokenizer as tokenizer_lib  # noqa: PLC0415

  if (args.text is None) == (args.file is None):
    raise UserError("lm tokenize needs the text, or --file F, but not both")
  text = args.text if args.file is None else read_text(args.file)
  tok = tokenizer_lib.load_tokenizer(args.workdir or args.tokenizer)
  ids = tok.encode([text])[0]
  if args.json:
    print(json.dumps({"ids": ids, "pieces": text_pieces(tok, ids)}, ensure_ascii=False))
  if args.html:
    try:
      with open(args.html, "w", encoding="utf-8") as f:
        f.write(render_html(tok, ids, summary(tok, ids, text)))
    except OSError as e:
      raise UserError(f"cannot write {args.html}: {e.strerror or e}") from None
    print(f"wrote {args.html}: {len(ids):,} tokens")
  if not args.json and not args.html:
    print(render_terminal(tok, ids, color=sys.stdout.isatty()))
    print(summary(tok, ids, text))


def read_text(path: str) -> str:
  """The text of a file (- is stdin), decoded as UTF-8 with errors='replace', as data sources are."""
  try:
    data = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
  except OSError as e:
    raise UserError(f"cannot read --file {path}: {e.strerror or e}") from None
  return data.decode("utf-8", errors="replace")


def summary(tok, ids: list[int], text: str) -> str:
  """One line: tokens, bytes, bytes per token and the tokenizer."""
  size = len(text.encode())
  ratio = f": {size / len(ids):.2f} bytes per token" if ids else ""
  return f"{len(ids):,} tokens for {size:,} bytes{ratio} ({tok.kind} tokenizer of {tok.vocab_size} tokens)"


def text_pieces(tok, ids: list[int]) -> list[str]:
  """Each token's share of the decoded text: a character split over tokens goes to the one with its last byte."""
  decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
  pieces = [decoder.decode(tok.piece_bytes(i)) for i in ids]
  if pieces:
    pieces[-1] += decoder.decode(b"", final=True)
  return pieces


def labels(tok, ids: list[int]) -> list[str | None]:
  """Per token, `<0xNN>` for each of its bytes if they are not whole characters alone, else None."""
  out = []
  for i in ids:
    data = tok.piece_bytes(i)
    try:
      data.decode()
      out.append(None)
    except UnicodeDecodeError:
      out.append("".join(f"<0x{b:02X}>" for b in data))
  return out


def visible(text: str) -> str:
  """`text` with spaces, line ends, tabs and other control characters drawn as visible symbols."""
  return "".join(VISIBLE.get(c) or (chr(0x2400 + ord(c)) if ord(c) < 0x20 else c) for c in text)


def render_terminal(tok, ids: list[int], color: bool) -> str:
  """The tokens as `[piece|id]` separated by spaces (a line break after a line end), or, with `color`, each
  piece on alternating background colours followed by its id, dimmed."""
  parts = []
  for n, (i, piece, label) in enumerate(zip(ids, text_pieces(tok, ids), labels(tok, ids), strict=True)):
    shown = label or visible(piece)
    parts.append(f"{TTY_BACKGROUNDS[n % 2]}{shown}\x1b[0m\x1b[2m{i}\x1b[0m" if color else f"[{shown}|{i}]")
    if n + 1 < len(ids):
      parts.append("\n" if piece.endswith("\n") else "" if color else " ")
  return "".join(parts)


def render_html(tok, ids: list[int], title: str) -> str:
  """A self-contained page: the text, each token a `<span>` on alternating colours whose `title` is its id (shown
  on hover). The spans' text is `text_pieces`, so the page's text is the input's; a token that is not whole
  characters shows its `<0xNN>` label through CSS, and a line end a ↵ before it."""
  spans = []
  for n, (i, piece, label) in enumerate(zip(ids, text_pieces(tok, ids), labels(tok, ids), strict=True)):
    body = html.escape(piece).replace("\r", "&#13;").replace("\n", '<i class="nl"></i>\n')
    extra = f' data-bytes="{html.escape(label)}"' if label else ""
    spans.append(f'<span class="t{n % 2}" title="{i}"{extra}>{body}</span>')
  return (
    '<!doctype html>\n<html><head><meta charset="utf-8"><title>lm tokenize</title>\n'
    f"<style>\n{HTML_STYLE}\n</style></head>\n<body>\n<p>{html.escape(title)}</p>\n"
    f"<pre>{''.join(spans)}</pre>\n</body></html>\n"
  )
