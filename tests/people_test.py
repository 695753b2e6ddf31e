"""The people world (lm.worlds.people) and the tool-call syntax and search tool (lm.tools)."""

import json

import pytest

from lm import tools
from lm.errors import UserError
from lm.worlds import people

SIZES = {"sft": 6, "probe_known": 3, "test_known": 3, "probe_unknown": 3, "test_unknown": 3, "tool": 5}


def read(path):
  return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  directory = tmp_path_factory.mktemp("people")
  return people.write_world(directory, seed=3, sizes=SIZES, paraphrases=(1, 3))


def test_the_world_is_the_same_from_the_same_seed(world, tmp_path):
  again = people.write_world(tmp_path, seed=3, sizes=SIZES, paraphrases=(1, 3))
  for name, path in world.items():
    assert open(path).read() == open(again[name]).read(), name
  other = people.write_world(tmp_path / "other", seed=4, sizes=SIZES, paraphrases=(1, 3))
  assert open(other["records"]).read() != open(world["records"]).read()


def test_groups_are_disjoint_and_only_pretrained_people_are_in_pretraining(world):
  records = read(world["records"])
  assert len(records) == sum(SIZES.values()) == len({r["id"] for r in records})
  rows = read(world["questions"])
  groups = {}
  for r in rows:
    groups.setdefault(r["group"], set()).add(r["person"])
  assert {g: len(v) for g, v in groups.items()} == SIZES
  assert len(rows) == sum(SIZES.values()) * len(people.ATTRIBUTES)
  for k in (1, 3):
    text = " ".join(d["text"] for d in read(world[f"pretrain_p{k}"]))
    for g, names in groups.items():
      for name in names:
        assert (name in text) == (g in people.PRETRAINED_GROUPS), (k, g, name)
  sft_text = open(world["sft_train"]).read()
  for g, names in groups.items():
    for name in names:
      assert (name in sft_text) == (g == "sft"), (g, name)
  tool_text = open(world["tool_train"]).read()
  for name in groups["test_unknown"] | groups["test_known"]:
    assert name not in tool_text


def test_passing_people_are_read_once_and_never_asked_about(world, tmp_path):
  sizes = {**SIZES, "passing": 7}
  paths = people.write_world(tmp_path, seed=3, sizes=sizes, paraphrases=(1, 3), repeats=2)
  groups = people.split_people(people.make_people(3, sum(sizes.values())), sizes)
  assert groups["sft"] == people.split_people(people.make_people(3, sum(SIZES.values())), SIZES)["sft"]
  asked = {r["person"] for r in read(paths["questions"])}
  assert asked == {r["person"] for r in read(world["questions"])}  # the same questions as without them
  assert len(read(paths["records"])) == sum(sizes.values())  # but they are in the records
  for k in (1, 3):
    docs = [d["text"] for d in read(paths[f"pretrain_p{k}"])]
    assert len(docs) == 2 * k * len([p for g in people.PRETRAINED_GROUPS for p in groups[g]]) + 7
    for p in groups["passing"]:
      (doc,) = [d for d in docs if p.name in d]  # one biography, stating each fact once
      assert doc.count(p.name) == len(people.ATTRIBUTES) and all(v in doc for v in p.attributes.values())
    for p in groups["test_known"]:
      assert sum(p.name in d for d in docs) == 2 * k
      assert len({d for d in docs if p.name in d}) == k  # the same k biographies, twice
  with pytest.raises(ValueError, match="repeats"):
    people.pretraining_documents(groups, 3, 1, repeats=0)
  # Without passing people or repeats the documents are `biographies`' (the study's default world).
  pretrained = [p for g in people.PRETRAINED_GROUPS for p in groups[g]]
  assert people.pretraining_documents({**groups, "passing": []}, 3, 3) == people.biographies(pretrained, 3, 3)


def test_biographies_state_every_fact_once_and_paraphrases_vary(world):
  people_list = people.split_people(people.make_people(3, sum(SIZES.values())), SIZES)
  person = people_list["sft"][0]
  singles = [d["text"] for d in read(world["pretrain_p1"]) if d["text"].startswith(person.name)]
  assert len(singles) == 1  # one fixed-order biography, starting with the first attribute's sentence
  assert singles[0].index(person.attributes["birth_year"]) < singles[0].index(person.attributes["employer"])
  multi = [d["text"] for d in read(world["pretrain_p3"]) if person.name in d["text"]]
  assert len(multi) == 3 and len(set(multi)) == 3
  for text in singles + multi:
    assert text.count(person.name) == len(people.ATTRIBUTES)
    for value in person.attributes.values():
      assert value in text


def test_check_reads_refusals_right_and_wrong_answers():
  attrs = {"birth_city": "Lakemoor", "birth_year": "1970"}
  assert people.check(attrs, "birth_city", " Lakemoor. ") == "correct"
  assert people.check(attrs, "birth_city", "Saltmere") == "wrong"
  assert people.check(attrs, "birth_city", "Lakemoor Saltmere") == "wrong"
  assert people.check(attrs, "birth_city", people.REFUSAL) == "refusal"
  assert people.refusal_text("birth_city") == "grew up in the city of... " + people.REFUSAL
  assert people.check(attrs, "birth_city", people.refusal_text("birth_city")) == "refusal"
  assert people.check(attrs, "birth_year", "I'm not sure, sorry") == "refusal"
  assert people.check(attrs, "birth_city", "Ana Bel grew up in the city of Lakemoor.") == "correct"
  assert people.check(attrs, "birth_year", "born in 19701") == "wrong"  # values are whole words
  assert people.named_values("birth_city", "from Saltmere to Quenby") == ["Saltmere", "Quenby"]


def test_identity_conversations_name_the_system_prompts_identity_and_hold_out_phrasings(world):
  convs = [c["messages"] for c in read(world["sft_train"]) if c["messages"][-1]["content"].startswith("I am ")]
  assert len(convs) == people.IDENTITY_CONVERSATIONS
  for messages in convs:
    if messages[0]["role"] == "system":
      name = messages[0]["content"].removeprefix("You are ").removesuffix(".")
      assert name in people.IDENTITIES and messages[-1]["content"] == f"I am {name}."
    else:
      assert messages[-1]["content"] == f"I am {people.DEFAULT_IDENTITY}."
  sft = open(world["sft_train"]).read()
  heldout = people.IDENTITY_QUESTIONS[-people.HELDOUT_IDENTITY_QUESTIONS :]
  assert all(q not in sft for q in heldout)
  rows = read(world["identity"])
  assert len(rows) == 2 * len(people.IDENTITIES) * len(people.IDENTITY_QUESTIONS)
  assert sum(r["heldout_phrasing"] for r in rows) == 2 * len(people.IDENTITIES) * len(heldout)
  with_system = [r for r in rows if r["system"]]
  assert len(with_system) == len(rows) // 2 and all(r["answer"] in r["system"] for r in with_system)


def test_tool_traces_search_then_answer_from_the_record(world):
  records = {r["id"]: r["text"] for r in read(world["records"])}
  traces = [c["messages"] for c in read(world["tool_train"]) if len(c["messages"]) == 4]
  pasted = [c["messages"] for c in read(world["tool_train"]) if len(c["messages"]) == 2]
  assert traces and len(traces) == len(pasted)
  for user, call, result, reply in traces:
    name, argument = tools.parse_call(call["content"], {"search": None})
    assert name == "search" and result["role"] == "tool" and result["content"] == records[argument]
    values = [v for a in people.ATTRIBUTES for v in people.named_values(a, reply["content"])]
    assert argument in user["content"] and len(values) == 1 and values[0] in result["content"]
    assert reply["content"] in {people.answer_text(a, values[0]) for a in people.ATTRIBUTES}
  for user, reply in pasted:
    record, question = user["content"].split("\n")
    (value,) = [v for a in people.ATTRIBUTES for v in people.named_values(a, reply["content"])]
    assert record in records.values() and value in record


def test_parse_call_tells_calls_malformed_calls_and_prose_apart():
  offered = {"search": None}
  assert tools.parse_call("search(Ana Bel)", offered) == ("search", "Ana Bel")
  assert tools.parse_call(" search( x ) ", offered) == ("search", "x")
  assert tools.parse_call("Lakemoor", offered) is None
  assert tools.parse_call("maybe (or not)", offered) is None
  name, error = tools.parse_call("search(Ana", offered)
  assert name == "" and "search(ARGUMENT)" in error
  name, error = tools.parse_call("lookup(Ana)", offered)
  assert name == "" and "no tool named lookup" in error and "search" in error


def test_search_tool_finds_records_and_says_when_it_cannot(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text(
    "".join(
      json.dumps({"text": t}) + "\n"
      for t in ("Ana Belko: born 1990.", "Ana Bel: born 1970.", "Ana Cor: born 1980.", "Tim Ro")
    )
  )
  name, search = tools.make_tool(f"search=jsonl:{path}")
  assert name == "search"
  assert search("ana bel") == "Ana Bel: born 1970."  # the whole name, not the longer one that starts with it
  assert search("Ana Be").splitlines() == ["Ana Belko: born 1990.", "Ana Bel: born 1970."]  # else any match
  assert search("Ana").splitlines() == ["Ana Belko: born 1990.", "Ana Bel: born 1970.", "Ana Cor: born 1980."]
  assert search("Zed") == "no results for Zed"
  assert search(" ").startswith("error:")
  for bad in ("search", "search=csv:x", "9x=jsonl:x"):
    with pytest.raises(UserError):
      tools.make_tool(bad)
  with pytest.raises(UserError, match="cannot read"):
    tools.make_tool(f"search=jsonl:{tmp_path / 'missing.jsonl'}")
