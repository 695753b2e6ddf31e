"""Tools a chat model calls mid-reply: the call syntax, the tools, and generation that runs them.

A tool call is an assistant turn whose whole content is `NAME(ARGUMENT)` (`call_text`), NAME a tool the
caller offers. Generation stops there (the turn ends with `<|end|>` as any reply does); `lm` runs the tool
and appends its result as a `tool` message, and the assistant writes its next turn with the result in its
context window. A turn that looks like a call (`WORD(` ...) but names no offered tool, or never closes its
parenthesis, gets an error message as the tool's result instead, so the model can recover; after
`max_calls` calls the next turn is the reply whatever it says.

Tools (`make_tool`):
  search=jsonl:PATH   the records of a JSON-lines file (each with a "text"): the texts that contain the
                      argument as whole words (case-insensitive), else those that contain it anywhere (a
                      prefix of a name finds the name), at most `SEARCH_RESULTS` of them, one a line, or
                      "no results for ARGUMENT". A whole name never brings back a longer one that starts
                      with it ("Nilo Taslo" does not find "Nilo Taslorik" when "Nilo Taslo" is there).
"""

import json
import re
from collections.abc import Callable

from lm.errors import UserError

CALL = re.compile(r"^([A-Za-z_]\w*)\((.*)\)$", re.DOTALL)
LOOKS_LIKE_CALL = re.compile(r"^([A-Za-z_]\w*)\(")
SEARCH_RESULTS = 3


def call_text(name: str, argument: str) -> str:
  """The assistant content that calls tool `name` with `argument`."""
  return f"{name}({argument})"


def parse_call(content: str, tools: dict) -> tuple[str, str] | None:
  """(tool name, argument) of a tool call, ("", error message) of a malformed one, None for a plain reply."""
  text = content.strip()
  head = LOOKS_LIKE_CALL.match(text)
  if head is None:
    return None
  name = head.group(1)
  match = CALL.match(text)
  if name not in tools:
    if match is None:
      return None  # prose that happens to start "word(": not a call
    return "", f"error: no tool named {name}; the tools are {', '.join(sorted(tools)) or 'none'}"
  if match is None:
    return "", f"error: a call to {name} must be written {call_text(name, 'ARGUMENT')}"
  return name, match.group(2).strip()


def search_tool(path: str) -> Callable[[str], str]:
  """The `search` tool over the JSON-lines records at `path`."""
  try:
    with open(path, encoding="utf-8") as f:
      texts = [json.loads(line)["text"] for line in f if line.strip()]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"search tool: cannot read records with a 'text' from {path}: {e}") from None

  def search(query: str) -> str:
    q = query.strip().lower()
    if not q:
      return "error: search needs a non-empty argument"
    anywhere = [t for t in texts if q in t.lower()]
    words = re.compile(rf"(?<!\w){re.escape(q)}(?!\w)")
    hits = [t for t in anywhere if words.search(t.lower())] or anywhere
    return "\n".join(hits[:SEARCH_RESULTS]) if hits else f"no results for {query.strip()}"

  return search


def make_tool(spec: str) -> tuple[str, Callable[[str], str]]:
  """(name, function) of a `--tool` spec `NAME=KIND:ARG` (module docstring)."""
  name, sep, source = spec.partition("=")
  kind, sep2, arg = source.partition(":")
  if not sep or not sep2 or not name.isidentifier():
    raise UserError(f"a tool is NAME=KIND:ARG, for example search=jsonl:records.jsonl; got {spec!r}")
  if kind != "jsonl":
    raise UserError(f"tool {name}: unknown kind {kind!r} (known: jsonl, a search over a JSON-lines file)")
  return name, search_tool(arg)


def make_tools(specs) -> dict[str, Callable[[str], str]]:
  return dict(make_tool(s) for s in specs)
