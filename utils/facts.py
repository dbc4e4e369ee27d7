"""Factual-recall prompts, and the filter that keeps the ones the model actually knows.

Each `Fact` is a subject, a prompt that contains the subject verbatim, and a one-token answer written with its
leading space (" Paris"). `FACTS` mixes relations (cities of landmarks, capitals, makers of products, languages,
sports, currencies, countries, continents, people's works); `known_facts(model)` keeps the facts whose answer is
the model's greedy top-1 next token, which is what causal tracing (chapter 05) needs: you can only trace a fact
the model gets right. Later chapters may reuse both.

    from utils.facts import FACTS, known_facts
    known = known_facts(model)            # list[KnownFact], in FACTS order
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fact:
    subject: str
    prompt: str  # contains `subject` exactly once; the answer is the next token
    answer: str  # one token, with its leading space
    relation: str

    def __post_init__(self) -> None:
        if self.prompt.count(self.subject) != 1:
            raise ValueError(f"the subject {self.subject!r} must occur exactly once in {self.prompt!r}")
        if not self.answer.startswith(" "):
            raise ValueError(f"the answer {self.answer!r} must start with a space")


@dataclass(frozen=True)
class KnownFact:
    fact: Fact
    answer_token: int
    probability: float  # the model's probability of the answer (it is also its top-1 token)

    @property
    def subject(self) -> str:
        return self.fact.subject

    @property
    def prompt(self) -> str:
        return self.fact.prompt

    @property
    def answer(self) -> str:
        return self.fact.answer


def _facts(relation: str, template: str, pairs: list[tuple[str, str]]) -> list[Fact]:
    return [Fact(subject, template.format(subject), " " + answer, relation) for subject, answer in pairs]


FACTS: list[Fact] = [
    *_facts("landmark city", "{} is in the city of", [
        ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
        ("The Brandenburg Gate", "Berlin"), ("The Sagrada Familia", "Barcelona"), ("The Kremlin", "Moscow"),
        ("The Acropolis", "Athens"), ("The Space Needle", "Seattle"), ("The Forbidden City", "Beijing"),
        ("The Louvre", "Paris"), ("The CN Tower", "Toronto"), ("Buckingham Palace", "London"),
        ("The Burj Khalifa", "Dubai"), ("The Hagia Sophia", "Istanbul"), ("Red Square", "Moscow"),
        ("The Prado Museum", "Madrid"), ("The Rijksmuseum", "Amsterdam"), ("The Atomium", "Brussels"),
        ("The Little Mermaid statue", "Copenhagen"), ("The Taj Mahal", "Agra"),
    ]),
    *_facts("capital", "The capital of {} is", [
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
        ("China", "Beijing"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
        ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
        ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Peru", "Lima"), ("South Korea", "Seoul"),
        ("the United Kingdom", "London"), ("New Zealand", "Wellington"), ("Saudi Arabia", "Riyadh"),
    ]),
    *_facts("maker", "{} is made by the company", [
        ("The iPhone", "Apple"), ("The PlayStation", "Sony"), ("The Xbox", "Microsoft"),
        ("The Galaxy smartphone", "Samsung"), ("The Corolla", "Toyota"), ("The Civic", "Honda"),
        ("The Mustang", "Ford"), ("Photoshop", "Adobe"), ("The Model S", "Tesla"), ("The Pixel phone", "Google"),
        ("The ThinkPad", "Lenovo"), ("The Walkman", "Sony"),
    ]),
    *_facts("language", "The official language of {} is", [
        ("Brazil", "Portuguese"), ("Austria", "German"), ("Egypt", "Arabic"), ("the Netherlands", "Dutch"),
        ("Japan", "Japanese"), ("Mexico", "Spanish"), ("Greece", "Greek"), ("Sweden", "Swedish"),
        ("Iran", "Persian"), ("Poland", "Polish"), ("South Korea", "Korean"), ("Saudi Arabia", "Arabic"),
    ]),
    *_facts("sport", "{} is famous for playing the sport of", [
        ("Michael Jordan", "basketball"), ("Tiger Woods", "golf"), ("Roger Federer", "tennis"),
        ("Serena Williams", "tennis"), ("Babe Ruth", "baseball"), ("Wayne Gretzky", "hockey"),
        ("LeBron James", "basketball"), ("Rafael Nadal", "tennis"), ("Kobe Bryant", "basketball"),
        ("Sachin Tendulkar", "cricket"), ("Lionel Messi", "football"), ("Derek Jeter", "baseball"),
        ("Novak Djokovic", "tennis"), ("Shaquille O'Neal", "basketball"),
    ]),
    *_facts("currency", "The currency of {} is the", [
        ("Japan", "yen"), ("the United Kingdom", "pound"), ("India", "rupee"), ("Mexico", "peso"),
        ("the United States", "dollar"), ("Germany", "euro"), ("Switzerland", "franc"), ("Russia", "ruble"),
    ]),
    *_facts("country", "{} is located in the country of", [
        ("Mount Fuji", "Japan"), ("Machu Picchu", "Peru"), ("Angkor Wat", "Cambodia"),
        ("The Great Wall", "China"), ("Stonehenge", "England"), ("Mount Kilimanjaro", "Tanzania"),
        ("The Amazon rainforest", "Brazil"), ("The Taj Mahal", "India"), ("Lake Titicaca", "Peru"),
        ("The Dead Sea", "Israel"),
    ]),
    *_facts("continent", "{} is a country in the continent of", [
        ("Kenya", "Africa"), ("Nigeria", "Africa"), ("Vietnam", "Asia"), ("Portugal", "Europe"),
        ("Mongolia", "Asia"), ("Egypt", "Africa"), ("Norway", "Europe"), ("Thailand", "Asia"),
    ]),
    *_facts("author", "{} was written by", [
        ("Romeo and Juliet", "William"), ("The Origin of Species", "Charles"), ("War and Peace", "Leo"),
    ]),
    Fact("Albert Einstein", "Albert Einstein developed the theory of", " relativity", "science"),
    Fact("Charles Darwin", "Charles Darwin proposed the theory of", " evolution", "science"),
    Fact("Isaac Newton", "Isaac Newton discovered the law of", " gravity", "science"),
    Fact("The Mona Lisa", "The Mona Lisa was painted by Leonardo da", " Vinci", "painter"),
    Fact("Hamlet", "Hamlet was written by William", " Shakespeare", "author"),
    Fact("Microsoft", "Microsoft was founded by Bill", " Gates", "founder"),
    Fact("Amazon", "Amazon was founded by Jeff", " Bezos", "founder"),
    Fact("Apple", "Apple was co-founded by Steve", " Jobs", "founder"),
]


def answer_token(model, answer: str) -> int | None:
    """The answer's token id, or None when `answer` (with its leading space) is not exactly one token."""
    tokens = model.to_tokens(answer, prepend_bos=False)[0]
    return int(tokens[0]) if len(tokens) == 1 else None


@torch.no_grad()
def known_facts(model, facts: list[Fact] | None = None) -> list[KnownFact]:
    """The facts whose one-token answer is the model's greedy top-1 next token, with its probability.

    One forward pass per prompt length (prompts of equal token length are batched, so no padding is involved).
    Facts whose answer is not a single token are dropped.
    """
    facts = FACTS if facts is None else facts
    by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for index, fact in enumerate(facts):
        tokens = model.to_tokens(fact.prompt)[0]
        by_length.setdefault(len(tokens), []).append((index, tokens))
    kept: dict[int, KnownFact] = {}
    for group in by_length.values():
        batch = torch.stack([tokens for _, tokens in group])
        probs = model(batch)[:, -1].float().softmax(-1)
        for row, (index, _) in enumerate(group):
            target = answer_token(model, facts[index].answer)
            if target is not None and int(probs[row].argmax()) == target:
                kept[index] = KnownFact(facts[index], target, float(probs[row, target]))
    return [kept[index] for index in sorted(kept)]
