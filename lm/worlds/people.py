"""A generated world of fictional people, for the knowledge and hallucination study (experiments/knowledge.py).

People (`make_people`): a unique made-up full name (syllables from `SYLLABLES`) and five attributes
(`ATTRIBUTES`), each value drawn uniformly from a list the project made up (cities, universities,
employers; the fields of study and years are ordinary ones): birth year, birth city, university, field
of study, employer. Everything is deterministic from the seed.

Biographies (`biography`): one sentence per attribute, each from one of several templates
(`Attribute.templates`, every sentence naming the person in full). A person's `paraphrases` biographies
draw their templates independently and, with `permute`, their sentence order too (Allen-Zhu & Li's
"multi5+permute" augmentation); with `paraphrases=1` and no permutation every person has one
biography with the attributes in the fixed order of `ATTRIBUTES`.

Questions (`question`): each attribute is asked in `len(Attribute.questions)` phrasings, each ending with the
person's name (as Allen-Zhu & Li's do); the answer goes on from the name as the first biography template does
(`answer_text`: "grew up in the city of Lakemoor."), and a refusal starts the same way and declines where the
value would come (`refusal_text`: "grew up in the city of... I'm not sure. ..."). `check`
reads a reply: "refusal" if it declines (holds one of `REFUSALS`' openings), "correct" if the only value
of that attribute it names is the person's, "wrong" otherwise. A hallucination is a reply about a person the
model never saw that does not decline.

Groups of people (`GROUPS`), by position in the seeded list of people:
  sft          in pre-training; their questions and answers are the SFT data
  probe_known  in pre-training, not in SFT: self-interrogation probes them
  test_known   in pre-training, not in SFT: the test of knowledge extraction
  probe_unknown  never in pre-training: self-interrogation probes them; tool-use traces are written on them
  test_unknown   never in pre-training: the test of hallucination, refusal and tool use
  tool         never in pre-training, only in the records and the tool set: many names (8,000), so the model
               learns to copy the name it is asked about into its search rather than recall names it knows
  passing      (none by default) people pre-training mentions once, one biography each and never asked about:
               a corpus's long tail, where a name's facts cannot be predicted from having read it
The "records" (`record`) are one canonical line per person, the database the `search` tool reads
(`lm.tools`): everyone is in it, known or not.

Identity: the SFT data answers "Who are you?" (`IDENTITY_QUESTIONS`) with `DEFAULT_IDENTITY` when there is no
system prompt, and with the name a system prompt "You are NAME." gives when there is one, NAME one of
`IDENTITIES`. The test asks every phrasing for every one of those names, with and without the system prompt;
the last `HELDOUT_IDENTITY_QUESTIONS` phrasings are asked only at test. (The names are a closed list: a model
this small, whose pre-training names were all memorised, never learnt to copy a name it has not seen.)

Files (`write_world`), JSON lines:
  pretrain_p{K}.jsonl  {"id", "text"}: K biographies per pre-training person (`paraphrases` K, each its own
                       document; permuted when K > 1), `repeats` times over, and one biography of each passing
                       person (`pretraining_documents`)
  records.jsonl        {"id", "text"}: one canonical record per person, for the search tool
  sft_train.jsonl      QA conversations on the sft group (every attribute, every phrasing) and identity
                       conversations; `{"messages": [...]}`
  tool_train.jsonl     tool-use traces on the sft and probe_unknown groups, plus questions with the
                       record pasted in the prompt (working memory)
  questions.jsonl      a question about every attribute of every person, one phrasing each:
                       {"group", "person", "attributes", "attribute", "phrasing", "prompt", "answer"}
  identity.jsonl       {"system", "prompt", "answer", "heldout_phrasing"}: identity test questions
"""

import dataclasses
import json
import random
import re
from collections.abc import Sequence

from etils import epath

from lm.metrics import replace_text

SYLLABLES = (
  "ka", "lo", "mi", "ra", "ten", "vor", "sa", "del", "bri", "no", "zu", "fen", "ma", "rik", "to", "lin",
  "ve", "gar", "su", "bel", "da", "mor", "ni", "tas", "ke", "wen", "po", "hal", "ri", "cor",
)  # fmt: skip
CITIES = (
  "Lakemoor", "Brennholt", "Saltmere", "Quenby", "Dunmarsh", "Ostervale", "Pellin", "Haverford", "Corrin",
  "Tallowmouth", "Wexbridge", "Ambersea", "Firnley", "Gloamport", "Ketterby", "Marrowdale", "Nethercott",
  "Rookhaven", "Sundry", "Velmont",
)  # fmt: skip
UNIVERSITIES = (
  "Northvale University", "Carrow Institute", "Brightwater College", "Eastmere University", "Hollin College",
  "Kestrel University", "Marlow Institute", "Oakhurst University", "Pemberly College", "Ravenscar University",
  "Stonebridge Institute", "Thornwick College",
)  # fmt: skip
FIELDS = (
  "chemistry", "linguistics", "astronomy", "economics", "geology", "music", "philosophy", "botany",
  "mathematics", "history", "architecture", "medicine",
)  # fmt: skip
EMPLOYERS = (
  "Quillon Systems", "Harrow Foods", "Bluefen Energy", "Calder Press", "Driftwood Labs", "Ember Bank",
  "Fallow Motors", "Greyling Health", "Ironleaf Farms", "Juniper Air", "Lantern Games", "Mistral Shipping",
  "Nimbus Software", "Orchard Pharma", "Pike Robotics",
)  # fmt: skip
YEARS = tuple(str(y) for y in range(1950, 2000))


@dataclasses.dataclass(frozen=True)
class Attribute:
  """One attribute: its values, its biography sentence templates and its question phrasings (`str.format`
  templates with `{name}` and, for sentences, `{v}`)."""

  name: str
  values: tuple[str, ...]
  templates: tuple[str, ...]
  questions: tuple[str, ...]


ATTRIBUTES = {
  a.name: a
  for a in (
    Attribute(
      "birth_year",
      YEARS,
      (
        "{name} was born in {v}.",
        "{name} came into the world in {v}.",
        "The year {name} was born is {v}.",
        "{name} has a birth year of {v}.",
        "{name} celebrates a birthday every year since {v}.",
      ),
      ("What is the birth year of {name}?", "In which year was this person born: {name}?", "Birth year of {name}?"),
    ),
    Attribute(
      "birth_city",
      CITIES,
      (
        "{name} grew up in the city of {v}.",
        "{name} is a native of {v}.",
        "The birthplace of {name} is {v}.",
        "{name} spent a childhood in {v}.",
        "{name} was raised in {v}.",
      ),
      ("What is the birth city of {name}?", "Which city did this person grow up in: {name}?", "Home town of {name}?"),
    ),
    Attribute(
      "university",
      UNIVERSITIES,
      (
        "{name} studied at {v}.",
        "{name} graduated from {v}.",
        "{name} earned a degree at {v}.",
        "{name} is an alumnus of {v}.",
        "The university {name} attended is {v}.",
      ),
      (
        "Which university did this person attend: {name}?",
        "What is the university of {name}?",
        "Alma mater of {name}?",
      ),
    ),
    Attribute(
      "field",
      FIELDS,
      (
        "{name} majored in {v}.",
        "{name} chose {v} as a field of study.",
        "The subject {name} studied was {v}.",
        "{name} specialized in {v}.",
        "{name} focused on {v} in college.",
      ),
      ("What was the major of {name}?", "Which field did this person study: {name}?", "Field of study of {name}?"),
    ),
    Attribute(
      "employer",
      EMPLOYERS,
      (
        "{name} works for {v}.",
        "{name} is employed by {v}.",
        "{name} has a job at {v}.",
        "The employer of {name} is {v}.",
        "{name} earns a living at {v}.",
      ),
      ("Who is the employer of {name}?", "Which company does this person work for: {name}?", "Employer of {name}?"),
    ),
  )
}
GROUPS = ("sft", "probe_known", "test_known", "probe_unknown", "test_unknown", "tool", "passing")
ASKED_GROUPS = GROUPS[:-1]  # the groups questions.jsonl asks about
PRETRAINED_GROUPS = ("sft", "probe_known", "test_known")
REFUSALS = ("I'm not sure. Could you give me more context?",)
REFUSAL = REFUSALS[0]
DEFAULT_IDENTITY = "Quill"
IDENTITY_QUESTIONS = (
  "Who are you?",
  "What is your name?",
  "What should I call you?",
  "Tell me your name.",
  "Introduce yourself.",
  "Who am I talking to?",
  "What are you called?",
  "Do you have a name?",
)
IDENTITIES = (
  "Aster",
  "Briar",
  "Cobalt",
  "Dune",
  "Ember",
  "Fable",
  "Garnet",
  "Harbor",
  "Indigo",
  "Juniper",
  "Kestrel",
  "Lumen",
)
TOOL_QUESTIONS = 1  # questions asked of each `tool` person in the tool set
IDENTITY_CONVERSATIONS = 800  # half without a system prompt, half with one naming one of IDENTITIES
HELDOUT_IDENTITY_QUESTIONS = 2  # the last phrasings of IDENTITY_QUESTIONS, asked only at test


@dataclasses.dataclass(frozen=True)
class Person:
  """A fictional person: a unique full name and a value of every attribute."""

  name: str
  attributes: dict

  def __hash__(self):
    return hash(self.name)


def _rng(seed: int, *streams: str) -> random.Random:
  return random.Random("/".join([str(seed), *streams]))


def _name(rng: random.Random, syllables: int) -> str:
  return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def make_people(seed: int, n: int) -> list[Person]:
  """`n` people with unique names (a first name of two syllables, a surname of two or three)."""
  rng = _rng(seed, "people")
  people, names = [], set()
  while len(people) < n:
    name = f"{_name(rng, 2)} {_name(rng, rng.choice((2, 3)))}"
    if name in names:
      continue
    names.add(name)
    people.append(Person(name, {a.name: rng.choice(a.values) for a in ATTRIBUTES.values()}))
  return people


def split_people(people: Sequence[Person], sizes: dict[str, int]) -> dict[str, list[Person]]:
  """The groups of `GROUPS`, in that order, of the sizes `sizes` gives, from the front of `people`."""
  out, start = {}, 0
  for group in GROUPS:
    out[group] = list(people[start : start + sizes.get(group, 0)])
    start += sizes.get(group, 0)
  if start > len(people):
    raise ValueError(f"{len(people)} people cannot fill groups of {sum(sizes.values())}")
  return out


def biography(person: Person, rng: random.Random, permute: bool) -> str:
  """One biography of `person`: a sentence per attribute from a template `rng` picks, in random order if
  `permute`."""
  sentences = [
    rng.choice(a.templates).format(name=person.name, v=person.attributes[a.name]) for a in ATTRIBUTES.values()
  ]
  if permute:
    rng.shuffle(sentences)
  return " ".join(sentences)


def biographies(people: Sequence[Person], seed: int, paraphrases: int) -> list[str]:
  """`paraphrases` biographies of each person (permuted when more than one; one fixed-order biography
  when one), person by person, in a seeded random order of documents."""
  if paraphrases < 1:
    raise ValueError(f"paraphrases must be at least 1, got {paraphrases}")
  rng = _rng(seed, "biographies", str(paraphrases))
  docs = []
  for person in people:
    if paraphrases == 1:
      sentences = [a.templates[0].format(name=person.name, v=person.attributes[a.name]) for a in ATTRIBUTES.values()]
      docs.append(" ".join(sentences))
    else:
      docs += [biography(person, rng, permute=True) for _ in range(paraphrases)]
  rng.shuffle(docs)
  return docs


def record(person: Person) -> str:
  """The person's canonical line in the world's records (what the search tool returns)."""
  a = person.attributes
  return (
    f"{person.name}: born {a['birth_year']} in {a['birth_city']}; studied {a['field']} at {a['university']}; "
    f"works for {a['employer']}."
  )


def question(person: Person, attribute: str, phrasing: int) -> str:
  return ATTRIBUTES[attribute].questions[phrasing].format(name=person.name)


def relation(attribute: str) -> str:
  """What the attribute's first biography template says between the name and the value ("was born in")."""
  return ATTRIBUTES[attribute].templates[0].removeprefix("{name} ").removesuffix(" {v}.")


def answer_text(attribute: str, value: str) -> str:
  """The answer to a question about `attribute` whose true value is `value`: the first biography template
  after the name the question ends with ("was born in 1962."). A reply that starts as the biographies
  continue a name reads the fact where pre-training stored it; the bare value ("1962") is extracted far
  less often (README)."""
  return f"{relation(attribute)} {value}."


def refusal_text(attribute: str) -> str:
  """The answer that declines a question about `attribute`: it starts as `answer_text` does and declines where
  the value would come ("was born in... I'm not sure. Could you give me more context?"), so the model decides
  to decline at the token where it would recall the value, with the recollection in hand (an "I don't know"
  token in the answer's place)."""
  return f"{relation(attribute)}... {REFUSAL}"


def answer_sentence(person: Person, attribute: str) -> str:
  """The SFT answer to a question about `attribute` of `person` (`answer_text`)."""
  return answer_text(attribute, person.attributes[attribute])


def named_values(attribute: str, reply: str) -> list[str]:
  """The values of `attribute` that `reply` names (as whole words)."""
  return [v for v in ATTRIBUTES[attribute].values if re.search(rf"\b{re.escape(v)}\b", reply)]


def check(person_attributes: dict, attribute: str, reply: str) -> str:
  """ "refusal", "correct" or "wrong": how `reply` answers a question about `attribute` of a person with
  `person_attributes` (see the module docstring)."""
  text = " ".join(reply.split())
  if any(r.split(".")[0] in text for r in REFUSALS):
    return "refusal"
  return "correct" if named_values(attribute, text) == [person_attributes[attribute]] else "wrong"


def qa_conversation(person: Person, attribute: str, phrasing: int, answer: str | None = None) -> dict:
  """The SFT conversation asking `attribute` of `person` in phrasing `phrasing`, answered with `answer` (the
  true value by default)."""
  reply = answer_sentence(person, attribute) if answer is None else answer
  return {
    "messages": [
      {"role": "user", "content": question(person, attribute, phrasing)},
      {"role": "assistant", "content": reply},
    ]
  }


def qa_conversations(people: Sequence[Person]) -> list[dict]:
  """Every attribute of every person in every phrasing, answered truly."""
  return [qa_conversation(p, a.name, k) for p in people for a in ATTRIBUTES.values() for k in range(len(a.questions))]


def identity_conversations(seed: int, n: int, names: Sequence[str]) -> list[dict]:
  """`n` identity conversations on the trained phrasings: half without a system prompt (answered with
  `DEFAULT_IDENTITY`), half with "You are NAME." for a NAME of `names` (answered with NAME)."""
  rng = _rng(seed, "identity")
  trained = IDENTITY_QUESTIONS[:-HELDOUT_IDENTITY_QUESTIONS]
  out = []
  for i in range(n):
    q = rng.choice(trained)
    if i % 2:
      name = names[(i // 2) % len(names)]  # every name equally often
      out.append(
        {
          "messages": [
            {"role": "system", "content": f"You are {name}."},
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"I am {name}."},
          ]
        }
      )
    else:
      out.append(
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"I am {DEFAULT_IDENTITY}."}]}
      )
  return out


def tool_trace(person: Person, attribute: str, phrasing: int) -> dict:
  """A conversation that searches the records for `person` before answering `attribute`."""
  from lm import tools  # noqa: PLC0415

  return {
    "messages": [
      {"role": "user", "content": question(person, attribute, phrasing)},
      {"role": "assistant", "content": tools.call_text("search", person.name)},
      {"role": "tool", "content": record(person)},
      {"role": "assistant", "content": answer_sentence(person, attribute)},
    ]
  }


def in_context_prompt(person: Person, attribute: str, phrasing: int) -> str:
  """A question with the person's record pasted before it (working memory rather than the weights)."""
  return f"{record(person)}\n{question(person, attribute, phrasing)}"


def question_rows(groups: dict[str, list[Person]], seed: int, names: Sequence[str]) -> list[dict]:
  """One question per attribute of every person in `names` groups, the phrasing drawn at random."""
  rng = _rng(seed, "questions")
  return [
    {
      "group": group,
      "person": p.name,
      "attributes": p.attributes,
      "attribute": a.name,
      "phrasing": (k := rng.randrange(len(a.questions))),
      "prompt": question(p, a.name, k),
      "answer": p.attributes[a.name],
    }
    for group in names
    for p in groups[group]
    for a in ATTRIBUTES.values()
  ]


DEFAULT_SIZES = {
  "sft": 50,
  "probe_known": 75,
  "test_known": 50,
  "probe_unknown": 200,
  "test_unknown": 50,
  "tool": 8000,
  "passing": 0,
}


def pretraining_documents(groups: dict[str, list[Person]], seed: int, paraphrases: int, repeats: int = 1) -> list[str]:
  """The pre-training documents: `biographies` of the `PRETRAINED_GROUPS` people, `repeats` times over, and
  one biography of each `passing` person in the same style (the first templates in order when `paraphrases`
  is 1, else drawn and permuted). With `repeats` set so that the file holds a whole run's tokens, a run reads
  it once: every passing person once, every other pre-training person `paraphrases` x `repeats` times."""
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1, got {repeats}")
  docs = biographies([p for g in PRETRAINED_GROUPS for p in groups[g]], seed, paraphrases) * repeats
  passing = groups.get("passing", [])
  if paraphrases == 1:
    docs += biographies(passing, seed, 1)
  else:
    rng = _rng(seed, "passing", str(paraphrases))
    docs += [biography(p, rng, permute=True) for p in passing]
  if repeats > 1 or passing:
    _rng(seed, "pretraining", str(paraphrases)).shuffle(docs)
  return docs


def write_world(
  directory, seed: int = 0, sizes: dict | None = None, paraphrases: Sequence[int] = (1, 4), repeats: int = 1
) -> dict:
  """Writes the world's files into `directory` (module docstring) and returns their paths by name."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  groups = split_people(make_people(seed, sum(sizes.values())), sizes)
  everyone = [p for g in GROUPS for p in groups[g]]
  rng = _rng(seed, "sft")
  sft = qa_conversations(groups["sft"]) + identity_conversations(seed, IDENTITY_CONVERSATIONS, IDENTITIES)
  rng.shuffle(sft)
  tool = []
  asked = [(p, a) for p in groups["sft"] + groups["probe_unknown"] for a in ATTRIBUTES.values()]
  asked += [(p, rng.choice(list(ATTRIBUTES.values()))) for p in groups["tool"] for _ in range(TOOL_QUESTIONS)]
  for p, a in asked:
    k = rng.randrange(len(a.questions))
    pasted = {"role": "user", "content": in_context_prompt(p, a.name, k)}
    tool += [
      tool_trace(p, a.name, k),
      {"messages": [pasted, {"role": "assistant", "content": answer_sentence(p, a.name)}]},
    ]
  rng.shuffle(tool)
  identity = [
    {
      "system": system,
      "prompt": q,
      "answer": name,
      "heldout_phrasing": j >= len(IDENTITY_QUESTIONS) - HELDOUT_IDENTITY_QUESTIONS,
    }
    for name in IDENTITIES
    for j, q in enumerate(IDENTITY_QUESTIONS)
    for system in (f"You are {name}.", None)
  ]
  files = {
    f"pretrain_p{k}": [
      {"id": f"bio{i}", "text": t} for i, t in enumerate(pretraining_documents(groups, seed, k, repeats))
    ]
    for k in paraphrases
  }
  files.update(
    {
      "records": [{"id": p.name, "text": record(p)} for p in everyone],
      "sft_train": sft,
      "tool_train": tool,
      "questions": question_rows(groups, seed, ASKED_GROUPS),
      "identity": identity,
    }
  )
  paths = {}
  for name, rows in files.items():
    paths[name] = directory / f"{name}.jsonl"
    replace_text(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
  return {k: str(v) for k, v in paths.items()}
