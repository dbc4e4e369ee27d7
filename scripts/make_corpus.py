"""Generate the course's shared text corpus, `data/corpus.jsonl.gz`, by sampling from SmolLM2-135M-Instruct.

Every document is the model's answer to one chat prompt "write a <genre> about <topic>". The (topic, genre)
pairs are shuffled with the seed and generated in batches until the cleaned documents hold at least
`--target-tokens` tokens (SmolLM2 tokenizer, no special tokens). Outputs are stripped of chat preambles,
trimmed to their last full sentence when cut off, deduplicated, and dropped when degenerate (too short,
repetitive, or a refusal). See data/README.md for the provenance of the committed file.

Run from the repository root (CPU, one thread; it took 32 minutes on a busy 2-core machine, BENCHMARKS.md):

    PYTHONPATH=. python scripts/make_corpus.py --out data/corpus.jsonl.gz --target-tokens 220000 --seed 0

The committed file was made with the defaults below (batch size 128, top-k 200, top-p 0.95, temperature 0.8).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import random
import re
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.models import load_hf_smollm2  # noqa: E402

TOPICS = [
    # Natural sciences
    "volcanoes", "earthquakes", "photosynthesis", "black holes", "the water cycle", "DNA", "the periodic table",
    "magnets", "electricity", "rainbows", "gravity", "the speed of light", "ocean tides", "glaciers", "clouds",
    "thunderstorms", "fossils", "dinosaurs", "evolution", "the human heart", "the immune system", "vaccines",
    "bacteria", "viruses", "sleep", "dreams", "the brain", "memory", "climate change", "coral reefs",
    "rainforests", "deserts", "the Arctic", "Antarctica", "the solar system", "Mars", "Jupiter", "comets",
    "the Moon", "the Sun", "stars", "galaxies", "telescopes", "microscopes", "atoms", "chemical reactions",
    "acids and bases", "sound waves", "friction", "the greenhouse effect", "soil", "mushrooms", "seeds",
    "trees", "flowers", "cacti", "bees", "ants", "butterflies", "spiders", "octopuses", "whales", "dolphins",
    "sharks", "penguins", "owls", "eagles", "parrots", "wolves", "elephants", "lions", "horses", "cats", "dogs",
    "rabbits", "frogs", "snakes", "turtles", "bats", "migration of birds", "hibernation", "camouflage in animals",
    # History and society
    "ancient Egypt", "the pyramids", "ancient Greece", "the Roman Empire", "the Vikings", "medieval castles",
    "knights", "the Silk Road", "the printing press", "the Renaissance", "the Industrial Revolution",
    "the steam engine", "the invention of the telephone", "the first airplane flight", "the Moon landing",
    "the history of writing", "the invention of money", "ancient China", "the Great Wall of China", "the Aztecs",
    "the Inca", "samurai", "pirates", "explorers", "the history of medicine", "libraries", "museums",
    "democracy", "elections", "taxes", "trade", "cities", "villages", "immigration", "human rights",
    "the history of the Olympic Games", "lighthouses", "trains", "canals", "bridges", "maps",
    # Geography and places
    "the Amazon River", "the Sahara", "the Himalayas", "mountains", "islands", "lakes", "rivers", "caves",
    "waterfalls", "the Pacific Ocean", "Iceland", "Japan", "Italy", "Kenya", "Brazil", "Canada", "Australia",
    "India", "Egypt", "Norway", "Mexico", "Peru", "a small fishing town", "a busy train station",
    "a farmers' market", "a public park", "a night market", "a mountain village",
    # Technology
    "computers", "the internet", "smartphones", "robots", "artificial intelligence", "video games",
    "programming", "passwords and online safety", "electric cars", "solar panels", "wind turbines",
    "batteries", "3D printing", "satellites", "rockets", "space stations", "drones", "email", "social media",
    "search engines", "cameras", "radio", "television", "clocks", "calculators", "spreadsheets", "databases",
    "encryption", "open-source software", "recycling electronics",
    # Everyday life
    "coffee", "tea", "bread", "cheese", "chocolate", "rice", "pasta", "soup", "apples", "bananas", "tomatoes",
    "potatoes", "spices", "honey", "breakfast", "picnics", "birthdays", "weddings", "holidays", "gardening",
    "houseplants", "cooking for a family", "baking cookies", "grocery shopping", "saving money", "budgeting",
    "moving to a new house", "cleaning the kitchen", "doing laundry", "learning to ride a bicycle",
    "learning to swim", "learning a new language", "studying for exams", "homework", "the first day of school",
    "teachers", "libraries in schools", "friendship", "siblings", "grandparents", "neighbours", "pets",
    "adopting a dog", "walking in the rain", "winter mornings", "summer holidays", "autumn leaves",
    "spring cleaning", "camping", "hiking", "fishing", "road trips", "airports", "hotels", "traffic",
    "public transport", "a job interview", "working from home", "retirement", "volunteering",
    "time management", "habits", "stress", "kindness", "patience", "courage", "honesty", "loneliness",
    "gratitude", "curiosity", "first aid", "brushing your teeth", "healthy eating", "exercise", "yoga",
    "running a marathon", "drinking enough water",
    # Arts, culture and hobbies
    "music", "the piano", "the violin", "guitars", "drums", "jazz", "opera", "painting", "sculpture",
    "photography", "poetry", "novels", "fairy tales", "theatre", "cinema", "dance", "knitting", "pottery",
    "origami", "woodworking", "chess", "board games", "puzzles", "magic tricks", "comics", "architecture",
    "fashion", "festivals", "fireworks", "calligraphy", "collecting stamps", "bird watching", "astronomy as a hobby",
    # Sports
    "football", "basketball", "tennis", "cricket", "baseball", "cycling races", "skiing", "surfing",
    "rock climbing", "swimming competitions", "the marathon", "table tennis", "golf", "sailing", "skateboarding",
    # Work and professions
    "doctors", "nurses", "firefighters", "farmers", "bakers", "carpenters", "plumbers", "electricians",
    "pilots", "astronauts", "scientists", "engineers", "lawyers", "journalists", "librarians", "chefs",
    "musicians", "architects", "veterinarians", "shopkeepers", "software developers", "mail carriers",
    "police officers", "translators", "beekeepers",
    # Ideas, maths and language
    "numbers", "fractions", "geometry", "probability", "prime numbers", "infinity", "the number zero",
    "logic puzzles", "statistics", "patterns in nature", "the alphabet", "grammar", "dictionaries",
    "proverbs", "jokes", "riddles", "languages of the world", "sign language", "philosophy", "ethics",
    "happiness", "time", "luck", "the future", "inventions", "mistakes", "teamwork", "leadership",
    "competition", "cooperation", "fairness", "secrets", "promises", "surprises",
    # Economy and environment
    "plastic pollution", "recycling", "clean water", "renewable energy", "endangered species", "forests",
    "composting", "electricity bills", "small businesses", "banks", "markets and prices", "advertising",
    "newspapers", "the postal service", "shipping containers", "factories", "supermarkets", "restaurants",
    "fast food", "farming", "fishing boats", "wool", "cotton", "paper", "glass", "steel", "wood", "salt",
]

# Genre name -> prompt template; {topic} is filled in.
GENRES = {
    "encyclopedia": "Write an encyclopedia-style paragraph about {topic}.",
    "story": "Write a short story in which {topic} plays an important part.",
    "how-to": "Write a practical step-by-step guide for a beginner who wants to learn about {topic}.",
    "dialogue": "Write a dialogue between two people who are talking about {topic}.",
    "news": "Write a short news article about a recent local event involving {topic}.",
    "letter": "Write a friendly letter to a cousin that talks about {topic}.",
    "recipe": "Write a recipe for a dish or drink inspired by {topic}, with ingredients and steps.",
    "poem": "Write a poem about {topic}.",
    "child-explanation": "Explain {topic} to a seven-year-old child in simple words.",
    "essay": "Write a short persuasive essay about why {topic} matters.",
    "faq": "Write a few frequently asked questions about {topic}, each with a short answer.",
    "diary": "Write a diary entry by someone who spent the day thinking about {topic}.",
    "study-notes": "Write concise study notes for a student learning about {topic}.",
}

# A first line such as "Sure! Here's a short story about cats:" is chat filler, not content.
PREAMBLE = re.compile(
    r"\A\s*(?:(?:sure|certainly|of course|absolutely|okay|ok)\b[^\n]{0,20}?[!.,]\s*)?"
    r"(?:here(?:'s| is| are)|below is)\b[^\n]{0,160}?:[ \t]*\n+",
    re.IGNORECASE,
)
REFUSAL = re.compile(r"\b(?:I'm sorry|I am sorry|I cannot|I can't|as an AI|language model)\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def distinct_ngram_ratio(words: list[str], n: int = 3) -> float:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def clean(text: str, truncated: bool) -> str:
    """Strip chat filler and surrounding whitespace; if the model was cut off, end at the last full sentence."""
    text = PREAMBLE.sub("", text.strip(), count=1).strip()
    if truncated:
        ends = list(SENTENCE_END.finditer(text))
        if ends and ends[-1].end() > 0.5 * len(text):
            text = text[: ends[-1].end()]
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def is_degenerate(text: str, n_tokens: int, min_tokens: int) -> bool:
    words = text.lower().split()
    if n_tokens < min_tokens or len(words) < 25:
        return True
    if REFUSAL.search(text[:200]):  # only near the start: characters may say "I'm sorry" in a story
        return True
    if distinct_ngram_ratio(words, 3) < 0.7:  # loops such as "a people of the earth, a people of the earth"
        return True
    raw = text.encode()
    if len(zlib.compress(raw)) / len(raw) < 0.3:  # very compressible = very repetitive
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) >= 4 and len(set(lines)) / len(lines) < 0.7:  # the same line over and over
        return True
    return False


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row: nucleus (top-p) sampling at `temperature`, within the `top_k` most likely tokens.

    Taking the top k first avoids sorting the whole 49k-token vocabulary at every step, which on a CPU costs more
    than the model's forward pass; at temperature 0.8 the nucleus almost never reaches past the top 200.
    """
    values, indices = (logits.float() / temperature).topk(top_k, dim=-1)  # sorted, most likely first
    probs = values.softmax(-1)
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # keep tokens until the kept mass reaches top_p
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).to(indices.device)
    return indices.gather(-1, choice).squeeze(-1)


@torch.inference_mode()
def sample_batch(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, eos_id: int, pad_id: int,
                 generator: torch.Generator) -> torch.Tensor:
    """`[batch, <= max_new_tokens]` sampled continuations of left-padded prompts, with the KV cache.

    A finished row (it sampled EOS) gets `pad_id` from then on; the loop stops once every row has finished.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   logits_to_keep=1)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = sample_next(out.logits[:, -1], temperature, top_p, top_k, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        new_tokens.append(token)
        finished |= token == eos_id
        if finished.all():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = hf_model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(new_tokens, dim=1)


def write_corpus(documents: list[dict], out: Path) -> None:
    """Write one JSON object per line, gzipped, atomically. mtime=0 makes the bytes depend on the content only."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".partial")
    with open(staging, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for document in documents:
            gz.write((json.dumps(document, ensure_ascii=False) + "\n").encode())
    staging.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/corpus.jsonl.gz", help="output path (.jsonl.gz)")
    parser.add_argument("--target-tokens", type=int, default=220_000, help="stop once the corpus holds this many")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt order and the sampling")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=200, help="sample only among the k most likely tokens")
    parser.add_argument("--min-tokens", type=int, default=40, help="drop documents shorter than this")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more threads than free cores is much slower)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    hf_model, tokenizer = load_hf_smollm2()
    tokenizer.padding_side = "left"  # decoder-only batched generation: pad on the left
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model.to(device)

    pairs = list(itertools.product(TOPICS, GENRES))
    random.Random(args.seed).shuffle(pairs)
    print(f"{len(TOPICS)} topics x {len(GENRES)} genres = {len(pairs)} possible prompts; device {device}")

    out = Path(args.out)
    documents: list[dict] = []
    seen: set[str] = set()
    total_tokens = n_generated = n_dropped = 0
    start = time.time()
    progress = tqdm(total=args.target_tokens, unit="tok", desc="corpus")
    for batch_index, first in enumerate(range(0, len(pairs), args.batch_size)):
        batch = pairs[first : first + args.batch_size]
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": GENRES[genre].format(topic=topic)}], tokenize=False, add_generation_prompt=True
            )
            for topic, genre in batch
        ]
        encoded = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + batch_index)  # each batch on its own
        new_tokens = sample_batch(hf_model, encoded["input_ids"], encoded["attention_mask"], args.max_new_tokens,
                                  args.temperature, args.top_p, args.top_k, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id, generator).cpu()
        for (topic, genre), row in zip(batch, new_tokens):
            n_generated += 1
            truncated = not bool((row == tokenizer.eos_token_id).any())
            text = clean(tokenizer.decode(row, skip_special_tokens=True), truncated)
            n_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            key = " ".join(text.lower().split())
            if is_degenerate(text, n_tokens, args.min_tokens) or key in seen:
                n_dropped += 1
                continue
            seen.add(key)
            documents.append({"id": f"doc{len(documents):05d}", "topic": topic, "genre": genre, "text": text})
            total_tokens += n_tokens
            progress.update(n_tokens)
        progress.set_postfix(docs=len(documents), dropped=n_dropped)
        # Written after every batch, so an interrupted run keeps what it made; rerunning with
        # --target-tokens equal to the tokens reached reproduces that file.
        write_corpus(documents, out)
        if total_tokens >= args.target_tokens:
            break
    progress.close()
    elapsed = time.time() - start
    if total_tokens < args.target_tokens:
        print(f"warning: ran out of prompts at {total_tokens} tokens (target {args.target_tokens})")
    print(
        f"wrote {len(documents)} documents, {total_tokens} tokens ({n_dropped} of {n_generated} generations dropped) "
        f"to {out} ({out.stat().st_size / 1e6:.2f} MB) in {elapsed / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
