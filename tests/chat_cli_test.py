"""`lm chat` end to end on the tiny run of sample_cli_test.py (trained once for this module, in this process
through `lm.cli.main`): one-shot JSON, stdin, dropping old turns, an interactive session, bad input.

Every sampling call has a batch of 1 or 2, a prompt of at most 16 tokens and at most 8 new ones, so the
programs compile once.
"""

import io
import json

import pytest
from sample_cli_test import run  # noqa: F401 (the module's trained run)

from lm import chat, chat_cli, cli, sample_cli, sampling
from lm.tokenizer import EOS_ID, ByteTokenizer, load_tokenizer

USER = [{"role": "user", "content": "line 1"}]


def lm_chat(capfd, *args, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
  if stdin is not None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
  capfd.readouterr()
  status = cli.main(["chat", *args])
  out, err = capfd.readouterr()
  return status, out, err


def one_shot(capfd, run, tmp_path, messages, *flags) -> tuple[list[dict], str]:  # noqa: F811
  """The JSON records `lm chat --messages F --json` prints for `messages`, and its stderr."""
  path = tmp_path / "messages.json"
  path.write_text(json.dumps(messages))
  status, out, err = lm_chat(capfd, "--workdir", str(run), "--messages", str(path), "--json", *flags)
  assert status == 0, err
  return [json.loads(line) for line in out.splitlines()], err


def test_one_shot_json_is_the_greedy_reply_of_the_rendered_prompt(run, tmp_path, capfd):  # noqa: F811
  (record,), err = one_shot(capfd, run, tmp_path, USER, "--temperature", "0", "--max-new-tokens", "8")
  assert not err
  assert set(record) == {"reply", "finish_reason", "tokens", "seed", "prompt_tokens", "dropped_messages", "logprobs"}
  tok = load_tokenizer(run)
  ids, _ = chat.render(tok, USER, generation_prompt=True)
  sampler, params, setup = sample_cli.load_sampler(str(run))
  request = sampling.SamplingParams(max_new_tokens=8, temperature=0.0, stop_tokens=chat.stop_tokens(tok))
  with setup.context():
    (g,) = sampler.generate(params, [ids], [request])
  assert record["reply"] == g.text and record["tokens"] == len(g.tokens)
  assert [t["id"] for t in record["logprobs"]] == g.tokens
  assert [t["logprob"] for t in record["logprobs"]] == pytest.approx(g.logprobs)
  assert "".join(t["text"] for t in record["logprobs"]) == g.text
  assert record["finish_reason"] == ("length" if len(g.tokens) == 8 else "end_of_turn")
  assert record["prompt_tokens"] == len(ids) == 10 and record["dropped_messages"] == 0 and record["seed"] == 0


def test_messages_from_stdin_and_a_json_line_per_sample(run, tmp_path, capfd, monkeypatch):  # noqa: F811
  flags = ["--max-new-tokens", "8", "--top-k", "20", "--seed", "5", "--num-samples", "2"]
  from_file, _ = one_shot(capfd, run, tmp_path, USER, *flags)
  args = ["--workdir", str(run), "--messages", "-", *flags]
  status, out, err = lm_chat(capfd, *args, "--json", stdin=json.dumps(USER), monkeypatch=monkeypatch)
  assert status == 0, err
  records = [json.loads(line) for line in out.splitlines()]
  assert records == from_file and [r["seed"] for r in records] == [5, 6]
  assert records[0]["logprobs"] != records[1]["logprobs"]
  # Without --json the same replies stream as text, each sample under its header.
  status, out, err = lm_chat(capfd, *args, stdin=json.dumps(USER), monkeypatch=monkeypatch)
  assert status == 0, err
  expected = "".join(f"=== sample {i + 1} of 2 (seed {r['seed']}) ===\n{r['reply']}\n" for i, r in enumerate(records))
  assert out == expected


def test_the_oldest_turns_go_when_the_history_outgrows_the_context(run, tmp_path, capfd):  # noqa: F811
  system = {"role": "system", "content": "s"}
  turns = [{"role": r, "content": f"line {i}"} for i, r in enumerate(["user", "assistant"] * 2 + ["user"])]
  # 8 ids per message, 3 for the system one: 1 + 3 + 5 * 8 + 1 = 45; with 8 new tokens, 24 of 32 fit.
  (record,), err = one_shot(capfd, run, tmp_path, [system, *turns], "--temperature", "0", "--max-new-tokens", "8")
  assert record["dropped_messages"] == 4
  assert err == "lm chat: dropped the oldest 4 messages to fit the context of 32 tokens (8 kept for the reply)\n"
  (kept,), err = one_shot(capfd, run, tmp_path, [system, turns[-1]], "--temperature", "0", "--max-new-tokens", "8")
  assert not err and kept == {**record, "dropped_messages": 0}
  # With room for one more turn, only the first goes.
  tok = load_tokenizer(run)
  ids, dropped = chat_cli.fit(tok, [system, *turns], 32, 3)
  assert dropped == 2 and ids == chat.render(tok, [system, *turns[2:]], generation_prompt=True)[0]


def test_an_interactive_session_keeps_the_replies_in_the_history(run, tmp_path, capfd, monkeypatch):  # noqa: F811
  prompts = []
  stream = sampling.Sampler.stream

  def recording(self, params, prompts_, requests, **kw):
    prompts.append((prompts_[0], requests[0].seed))
    return stream(self, params, prompts_, requests, **kw)

  monkeypatch.setattr(sampling.Sampler, "stream", recording)
  flags = ["--max-new-tokens", "4", "--top-k", "20", "--seed", "7"]
  # An empty line, one too long for the context, two turns that fit, a third that pushes out the first, /exit.
  lines = "line 1\n\n" + "x" * 30 + "\nline 2\nline 3\n/exit\nline 4\n"
  status, out, err = lm_chat(capfd, "--workdir", str(run), *flags, stdin=lines, monkeypatch=monkeypatch)
  assert status == 0, err
  skipped, dropped = err.splitlines()
  assert skipped.startswith("lm chat: message skipped: the last turn (34 tokens") and "of 32 tokens" in skipped
  assert dropped == "lm chat: dropped the oldest 2 messages to fit the context of 32 tokens (4 kept for the reply)"
  assert len(prompts) == 3  # line 4 comes after /exit
  tok = load_tokenizer(run)
  user = [{"role": "user", "content": f"line {i}"} for i in range(4)]
  history, replies = [], []
  for turn, i in enumerate([1, 2, 3]):
    history = [*history, user[i]][-3:]  # the third turn's prompt has lost the first
    (record,), _ = one_shot(capfd, run, tmp_path, history, *flags[:-1], str(7 + turn))  # turn k: seed + k
    assert prompts[turn] == (chat.render(tok, history, generation_prompt=True)[0], 7 + turn)  # replies included
    replies.append(record["reply"])
    history.append({"role": "assistant", "content": record["reply"]})
  assert out == "".join(f"{r}\n" for r in replies)
  # EOF ends a session as /exit does.
  status, out, err = lm_chat(capfd, "--workdir", str(run), *flags, stdin="line 1\n", monkeypatch=monkeypatch)
  assert status == 0 and out == f"{replies[0]}\n" and not err


def test_the_finish_reason_says_what_ended_the_reply():
  tok = ByteTokenizer()
  end = chat.stop_tokens(tok)[0]
  request = sampling.SamplingParams(max_new_tokens=4, stop_tokens=(end,), stop_strings=("c",))
  ab = tok.encode(["ab"])[0]
  assert chat_cli.finish_reason(tok, request, [*ab, end], [0.0] * 3) == "end_of_turn"
  assert chat_cli.finish_reason(tok, request, [*ab, EOS_ID], [0.0] * 3) == "end_of_turn"
  assert chat_cli.finish_reason(tok, request, [*ab, *ab], [0.0] * 4) == "length"
  assert chat_cli.finish_reason(tok, request, tok.encode(["abc"])[0] + [end], [0.0] * 4) == "stop"
  assert chat_cli.finish_reason(tok, request, [*ab, end, *tok.encode(["c"])[0]], [0.0] * 4) == "end_of_turn"


CASES = {
  "not JSON": ("{oops", "--messages {path} is not JSON: Expecting property name"),
  "not a list": ('{"role": "user", "content": "hi"}', "a conversation is a list of messages, got dict"),
  "empty": ("[]", "the conversation is empty"),
  "not a message": ('["hi"]', "message 0 is not an object with 'role' and 'content'"),
  "unknown role": ('[{"role": "bot", "content": "hi"}]', "message 0 has unknown role 'bot'"),
  "content not text": ('[{"role": "user", "content": 3}]', "message 0 content is not a string (got int)"),
  "last from the assistant": (
    json.dumps([*USER, {"role": "assistant", "content": "hi"}]),
    "the last message is from the assistant; a reply follows a user or tool message",
  ),
  "a last turn too long": (json.dumps([{"role": "user", "content": "x" * 30}]), "leaves no room for max_new_tokens"),
  "two system prompts": (json.dumps([{"role": "system", "content": "a"}, *USER]), "--system and a system message"),
  "missing file": (None, "cannot read --messages {tmp}/nope.json: No such file or directory"),
  "json without messages": ("no file", "--json needs --messages"),
  "samples in a session": ("no file", "--num-samples needs --messages"),
  "a decoding flag": (json.dumps(USER), "top_p must be in (0, 1], got 1.5"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(run, tmp_path, capfd, case):  # noqa: F811
  text, message = CASES[case]
  path = tmp_path / "messages.json"
  if text is None:
    path = tmp_path / "nope.json"
  elif text != "no file":
    path.write_text(text)
  args = ["--workdir", str(run), "--max-new-tokens", "8"]
  if text != "no file":
    args += ["--messages", str(path), "--json"]
  args += {
    "two system prompts": ["--system", "b"],
    "samples in a session": ["--num-samples", "2"],
    "json without messages": ["--json"],
    "a decoding flag": ["--top-p", "1.5"],
  }.get(case, [])
  status, out, err = lm_chat(capfd, *args)
  assert status == 2 and not out
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("lm: error: ") and message.format(path=path, tmp=tmp_path) in err, err
