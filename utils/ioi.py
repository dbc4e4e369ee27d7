"""Indirect-object-identification (IOI) prompts, as in Wang et al. (2022), "Interpretability in the Wild".

    "When Mary and John went to the store, John gave a drink to" -> " Mary"

The indirect object (IO, Mary) appears once; the subject (S, John) twice (S1, S2). Templates come in two orders:
ABBA (IO first) and BABA (S first). Every name, place and object is a single SmolLM2 token after a leading
space, and every template has the same number of tokens, so a dataset is one rectangular batch and each role sits
at one known position per prompt.

    data = make_ioi_dataset(model, n_prompts=32, seed=0)
    clean_logits = model(data.tokens)
    logit_diff(clean_logits, data)              # [n_prompts]: logit(IO) - logit(S) at the last position
    abc = data.abc(model, seed=1)               # Wang et al.'s ABC distribution: IO, S1 and S2 all replaced
    corrupted = data.corrupted(model, seed=1)   # a milder corruption: only S2 replaced by a third name
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

NAMES = ("Mary John Tom James Dan Sid Martin Amy Lisa Michael Sarah Paul Anna Kate Mark Peter David Emma Alice Bob "
         "Jack Laura Rachel Kevin Steve Chris Jane Eric Adam Ben Sam Tim Max Jim Anne Carl Joe Grace Henry Ryan").split()
PLACES = "store park school market beach office restaurant garden library station hospital church".split()
OBJECTS = "drink book ring bone kiss basketball computer necklace snack".split()  # all take "a"

# {IO}, {S} are the names; S appears twice. Each template is written once per order.
TEMPLATES = {
    "ABBA": [
        "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to",
        "After {IO} and {S} arrived at the {PLACE}, {S} handed a {OBJECT} to",
        "While {IO} and {S} were at the {PLACE}, {S} passed a {OBJECT} to",
    ],
    "BABA": [
        "When {S} and {IO} went to the {PLACE}, {S} gave a {OBJECT} to",
        "After {S} and {IO} arrived at the {PLACE}, {S} handed a {OBJECT} to",
        "While {S} and {IO} were at the {PLACE}, {S} passed a {OBJECT} to",
    ],
}


ALL_TEMPLATES = [template for order in ("ABBA", "BABA") for template in TEMPLATES[order]]


@dataclass(frozen=True)
class IOIDataset:
    prompts: list[str]
    orders: list[str]  # "ABBA" or "BABA" per prompt
    io_names: list[str]
    s_names: list[str]
    tokens: torch.Tensor  # [n_prompts, seq], BOS first
    io_tokens: torch.Tensor  # [n_prompts] token id of " IO"
    s_tokens: torch.Tensor  # [n_prompts] token id of " S"
    positions: dict[str, torch.Tensor]  # "IO", "S1", "S2", "END" -> [n_prompts] positions in `tokens`
    _fill: tuple  # what generated each prompt (template, place, object), for making corrupted copies

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def template_ids(self) -> torch.Tensor:
        """`[n_prompts]`: which template (order and wording) made each prompt, as an index into ALL_TEMPLATES."""
        return torch.tensor([ALL_TEMPLATES.index(template) for template, _, _ in self._fill])

    def abc(self, model, seed: int = 1) -> "IOIDataset":
        """Wang et al.'s ABC distribution: the same templates, places and objects, but IO, S1 and S2 replaced by
        three different names A, B, C (none of them the prompt's IO or S), so the sentence holds no repeated name
        and no clue to the answer. Answers are unchanged: `logit_diff` on it still compares the clean IO and S
        tokens. The positions of the names are those of the clean prompt."""
        rng = random.Random(seed)
        names = [name for name in NAMES if _is_single_token(model, name)]
        texts = []
        for (template, place, obj), io, s in zip(self._fill, self.io_names, self.s_names):
            a, b, c = rng.sample([name for name in names if name not in (io, s)], 3)
            first, second = template.split("{S}", 1)[0], "{S}".join(template.split("{S}")[1:])
            texts.append(_format(first + "{S}" + second.replace("{S}", "{C}"), a, b, place, obj, c))
        return replace(self, prompts=texts, tokens=_tokenize(model, texts))

    def corrupted(self, model, seed: int = 1) -> "IOIDataset":
        """The ABC distribution: the same templates, places and objects, but the second mention of the subject
        is a third name C, so the sentence no longer says who the indirect object is. Answers are unchanged:
        `logit_diff` on it still compares the clean IO and S tokens."""
        rng = random.Random(seed)
        texts = []
        for (template, place, obj), io, s in zip(self._fill, self.io_names, self.s_names):
            third = rng.choice([name for name in NAMES if name not in (io, s)])
            first, second = template.split("{S}", 1)[0], "{S}".join(template.split("{S}")[1:])
            texts.append(_format(first + "{S}" + second.replace("{S}", "{C}"), io, s, place, obj, third))
        tokens = _tokenize(model, texts)
        return replace(self, prompts=texts, tokens=tokens)


def _format(template: str, io: str, s: str, place: str, obj: str, third: str | None = None) -> str:
    return template.format(IO=io, S=s, PLACE=place, OBJECT=obj, C=third)


def single_token_id(model, word: str) -> int:
    """The id of ` word` (with its leading space); ValueError if it is not a single token."""
    ids = model.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"' {word}' is {len(ids)} tokens for this tokenizer; IOI needs single-token words.")
    return ids[0]


def _tokenize(model, texts: list[str]) -> torch.Tensor:
    rows = [model.to_tokens(text)[0] for text in texts]
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"IOI prompts tokenised to different lengths {sorted(lengths)}; every name, place and object "
                         f"must be a single token for this model's tokenizer.")
    return torch.stack(rows).to(model.cfg.device)


def make_ioi_dataset(model, n_prompts: int = 32, seed: int = 0, orders: tuple[str, ...] = ("ABBA", "BABA"),
                     templates_per_order: int | None = None) -> IOIDataset:
    """`n_prompts` IOI prompts, alternating between the given orders, names drawn without repetition per prompt."""
    if n_prompts < 1:
        raise ValueError("n_prompts must be at least 1.")
    unknown = set(orders) - set(TEMPLATES)
    if unknown:
        raise ValueError(f"Unknown template order(s) {sorted(unknown)}; use 'ABBA' and/or 'BABA'.")
    rng = random.Random(seed)
    names = [name for name in NAMES if _is_single_token(model, name)]
    texts, used_orders, ios, ss, fills = [], [], [], [], []
    for i in range(n_prompts):
        order = orders[i % len(orders)]
        template = rng.choice(TEMPLATES[order][:templates_per_order])
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        texts.append(_format(template, io, s, place, obj))
        used_orders.append(order)
        ios.append(io)
        ss.append(s)
        fills.append((template, place, obj))
    tokens = _tokenize(model, texts)
    io_tokens = torch.tensor([single_token_id(model, name) for name in ios], device=tokens.device)
    s_tokens = torch.tensor([single_token_id(model, name) for name in ss], device=tokens.device)
    positions = {
        "IO": _first_position(tokens, io_tokens),
        "S1": _first_position(tokens, s_tokens),
        "S2": _last_position(tokens, s_tokens),
        "END": torch.full((n_prompts,), tokens.shape[1] - 1, device=tokens.device),
    }
    return IOIDataset(texts, used_orders, ios, ss, tokens, io_tokens, s_tokens, positions, tuple(fills))


def _is_single_token(model, word: str) -> bool:
    return len(model.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def _first_position(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (tokens == targets[:, None]).int().argmax(dim=1)


def _last_position(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flipped = (tokens == targets[:, None]).flip(dims=[1]).int().argmax(dim=1)
    return tokens.shape[1] - 1 - flipped


def logit_diff(logits: torch.Tensor, data: IOIDataset, per_prompt: bool = True) -> torch.Tensor:
    """logit(IO) - logit(S) at the last position: [n_prompts], or its mean if per_prompt=False."""
    if logits.ndim != 3 or logits.shape[0] != len(data):
        raise ValueError(f"logit_diff expects logits of shape [n_prompts={len(data)}, seq, vocab], "
                         f"got {tuple(logits.shape)}.")
    last = logits[:, -1]
    rows = torch.arange(len(data), device=last.device)
    diff = last[rows, data.io_tokens.to(last.device)] - last[rows, data.s_tokens.to(last.device)]
    return diff if per_prompt else diff.mean()
