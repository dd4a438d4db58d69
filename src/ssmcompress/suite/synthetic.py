"""Synthetic long-context tasks where dropping the wrong tokens visibly hurts.

- Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): a list of key-value pairs, then queries;
  every answer is a value seen once, far back in the sequence.
- Fact QA over a story with distractor sentences (bAbI task 1 style, Weston et al. 2015): people move between
  places, irrelevant sentences are interleaved; the question asks where one person is now.

Each generator takes a `random.Random` and returns a multiple-choice document
`{"context", "choices", "label", ...}`; `as_text(doc)` is the same document as training text. Training and
evaluation draw from the same distribution with disjoint seeds.
"""
from __future__ import annotations

import random

KEYS = ("apple", "arrow", "basket", "bell", "boat", "bread", "bridge", "candle", "castle", "chain", "cloud",
        "coin", "crown", "cup", "door", "dragon", "drum", "eagle", "feather", "field", "flag", "flower", "fox",
        "garden", "gate", "glove", "hammer", "harp", "hat", "hill", "horn", "horse", "island", "key", "knife",
        "ladder", "lamp", "letter", "lion", "map", "mask", "mirror", "moon", "needle", "owl", "pearl", "pen",
        "pillow", "ring", "river", "rope", "rose", "sail", "shell", "shield", "ship", "silver", "snake", "star",
        "stone", "sword", "table", "tower", "tree", "wheel", "window", "wolf", "wood")
VALUES = tuple(str(v) for v in range(10, 100))
PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Anne", "Peter", "Julia", "Henry")
PLACES = ("kitchen", "garden", "hallway", "bedroom", "bathroom", "office", "cellar", "library", "stable", "chapel")
MOVES = ("went to the", "moved to the", "travelled to the", "journeyed to the", "walked into the", "ran to the")
DISTRACTORS = ("The wind howled outside.", "A dog barked in the street.", "The candles burned low.",
               "Rain fell on the roof.", "Somebody laughed in the distance.", "The clock struck the hour.",
               "A cart rolled past the window.", "The fire crackled.", "Bells rang in the town.",
               "The sky grew dark.", "A bird sang in the tree.", "The soup was cold.", "Nobody spoke for a while.",
               "The door creaked.", "A letter lay on the table.", "The horses were restless.",
               "Music drifted from the tavern.", "The river was high that spring.")


def mqar(rng: random.Random, n_pairs: int = 8, n_queries: int = 8, unrecalled: bool = False) -> dict:
    """`n_pairs` key-value pairs, `n_queries - 1` answered queries, then one query to score.

    The suite uses 8 pairs: the bundled tiny Mamba-2 (d_model 128) recalls 8 pairs perfectly but fewer of 10 or 12,
    and a task the dense model cannot do cannot show what reduction destroys.

    Choices: the true value and three other values from the same list (so every choice was seen in context). With
    every pair recalled (n_queries = n_pairs, the offline suite's MQAR) the three wrong values are all repeated in
    the recall list and the answer is the one choice it lacks: the task can be solved by elimination from the recall
    list alone (the bundled Mamba-2 answers 83.8 % of the offline suite's from the recall list without the pairs:
    experiments/mqar_shortcut.py).
    `unrecalled`: the wrong values are those of pairs the recall list does not repeat (values it does not hold), so
    only the pairs themselves answer; needs n_queries <= n_pairs - 3.
    """
    if unrecalled:
        return mqar_unrecalled(rng, n_pairs, n_queries)
    keys = rng.sample(KEYS, n_pairs)
    values = [rng.choice(VALUES) for _ in keys]
    while len(set(values)) < min(4, n_pairs):
        values = [rng.choice(VALUES) for _ in keys]
    asked = rng.sample(range(n_pairs), n_queries)
    answer = values[asked[-1]]
    seen = sorted(set(values) - {answer})
    others = rng.sample(seen, 3) if len(seen) >= 3 else seen + rng.sample(sorted(set(VALUES) - set(values)), 3 - len(seen))
    return mqar_document(rng, keys, values, asked, others)


def mqar_unrecalled(rng: random.Random, n_pairs: int, n_queries: int) -> dict:
    """mqar with the wrong choices taken from the values of pairs the recall list does not repeat (see `mqar`)."""
    if n_queries > n_pairs - 3:
        raise ValueError(f"unrecalled wrong choices need 3 pairs outside the {n_queries} queries, got {n_pairs} pairs")
    while True:
        keys = rng.sample(KEYS, n_pairs)
        values = [rng.choice(VALUES) for _ in keys]
        asked = rng.sample(range(n_pairs), n_queries)
        recalled = {values[i] for i in asked[:-1]}
        answer = values[asked[-1]]
        wrong = sorted({values[i] for i in range(n_pairs) if i not in asked} - recalled - {answer})
        if answer not in recalled and len(wrong) >= 3:
            break
    return mqar_document(rng, keys, values, asked, rng.sample(wrong, 3))


def mqar_document(rng: random.Random, keys: list, values: list, asked: list, wrong: list) -> dict:
    """The MQAR document of these pairs: the `asked` pairs but the last recalled, the last one's key the question,
    its value and the `wrong` ones the choices, in a shuffled order."""
    target = asked[-1]
    answer = values[target]
    choices = [answer] + wrong
    rng.shuffle(choices)
    memory = ", ".join(f"{k} {v}" for k, v in zip(keys, values))
    answered = " ".join(f"{keys[i]} {values[i]}." for i in asked[:-1])
    context = f"Remember: {memory}.\nRecall: {answered} {keys[target]}"
    return dict(context=context, choices=choices, label=choices.index(answer), key=keys[target],
                key_position=target, n_pairs=len(keys), memory=memory,
                recalled=[[keys[i], values[i]] for i in asked])


def story(rng: random.Random, n_moves: int = 16, n_distractors: int = 12, n_people: int = 4) -> dict:
    """A bAbI-1 style story; the question asks about a person whose last move is not among the last sentences."""
    people = rng.sample(PEOPLE, n_people)
    places = rng.sample(PLACES, 8)
    sentences, where, last_move, history = [], {}, {}, {p: [] for p in people}
    events = ["move"] * n_moves + ["distractor"] * n_distractors
    rng.shuffle(events)
    for event in events:
        if event == "move":
            person = rng.choice(people)
            place = rng.choice([p for p in places if p != where.get(person)])
            where[person], last_move[person] = place, len(sentences)
            history[person].append(place)
            sentences.append(f"{person} {rng.choice(MOVES)} {place}.")
        else:
            sentences.append(rng.choice(DISTRACTORS))
    # ask about the person whose latest move is oldest: the answer sits furthest back in the story
    person = min(where, key=lambda p: last_move[p])
    answer = where[person]
    # wrong choices: places the person has been before first (the tempting answers), then any other place
    before = list(dict.fromkeys(p for p in history[person] if p != answer))
    rest = [p for p in places if p != answer and p not in before]
    others = (rng.sample(before, len(before)) + rng.sample(rest, len(rest)))[:3]
    choices = [answer] + others
    rng.shuffle(choices)
    context = "Story:\n" + " ".join(sentences) + f"\nQuestion: Where is {person}?\nAnswer:"
    return dict(context=context, choices=choices, label=choices.index(answer), person=person,
                fact_sentence=last_move[person], n_sentences=len(sentences), where=dict(where))


def as_text(doc: dict) -> str:
    """The document with its answer, as lm-eval scores it (answer after a space)."""
    return f"{doc['context']} {doc['choices'][doc['label']]}"


def training_mqar(rng: random.Random, progress: float = 1.0) -> list[tuple[str, bool]]:
    """An MQAR training document as (piece, is_answer) pieces: every recalled value is a training target.

    `progress` in [0, 1] is the curriculum: the number of pairs grows from at most 4 to at most 40 (the evaluation
    uses 8). Recall is learnt through a sudden phase transition that few-pair documents reach far sooner.
    """
    n_pairs = rng.randint(2, round(4 + progress * 36))
    doc = mqar(rng, n_pairs=n_pairs, n_queries=rng.randint(min(2, n_pairs), min(16, n_pairs)))
    return [(f"Remember: {doc['memory']}.\nRecall:", False)] + recall_pieces(doc)


def recall_pieces(doc: dict) -> list[tuple[str, bool]]:
    """An MQAR document's recall list as training pieces: " key" then " value" (a target) per query, "."-joined."""
    pieces = []
    for i, (key, value) in enumerate(doc["recalled"]):
        pieces += [(("." if i else "") + " " + key, False), (" " + value, True)]
    return pieces


def training_story(rng: random.Random, progress: float = 1.0) -> list[tuple[str, bool]]:
    """A story followed by questions about every person (the first is the evaluation's); answers are targets.

    Curriculum as for MQAR: from 2 people and a few sentences to 6 people, 32 moves and 24 distractors.
    """
    n_people = rng.randint(2, round(2 + progress * 4))
    doc = story(rng, n_moves=rng.randint(n_people, round(n_people + 2 + progress * 28)),
                n_distractors=rng.randint(0, round(2 + progress * 22)), n_people=n_people)
    return [(doc["context"], False), (" " + doc["choices"][doc["label"]], True)] + other_questions(doc)


def other_questions(doc: dict) -> list[tuple[str, bool]]:
    """A story's questions about every person but the scored one, as training pieces (the answers are targets)."""
    return [piece for person, place in doc["where"].items() if person != doc["person"]
            for piece in ((f"\nQuestion: Where is {person}?\nAnswer:", False), (" " + place, True))]


def level_docs(rng: random.Random, progress: float, n: int) -> dict[str, list[dict]]:
    """Evaluation documents at the hardest setting of curriculum level `progress` (the adaptive curriculum's test)."""
    pairs = round(4 + progress * 36)
    people = round(2 + progress * 4)
    return dict(mqar=[mqar(rng, n_pairs=pairs, n_queries=min(8, pairs)) for _ in range(n)],
                story=[story(rng, n_moves=round(people + 2 + progress * 28), n_distractors=round(2 + progress * 22),
                             n_people=people) for _ in range(n)])
