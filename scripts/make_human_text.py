"""Bake human-written English prose into data/sae_human_text.jsonl.gz, for training chapter 08's SAE.

The shared corpus (data/corpus.jsonl.gz) is SmolLM2's own writing. A sparse autoencoder trained only on that
learns the model's own distribution; human text adds vocabulary and styles the model did not produce itself.

Source: the Python 3.11 documentation as Debian ships it (package `python3-doc`, `apt-get install python3-doc`),
the reStructuredText sources under /usr/share/doc/python3.11/html/_sources. It is written by people (Guido van
Rossum, Fred L. Drake Jr. and the Python developers) and released under the PSF License Agreement (version 2),
a permissive licence compatible with the course's Apache-2.0; see /usr/share/doc/python3-doc/copyright.
It is technical prose (tutorials, HOWTOs, the FAQ, "What's New", the language and library references).

Only prose paragraphs are kept: headings, directives, tables, code blocks and indented examples are dropped,
and inline markup (:func:`x`, ``x``, `text <url>`_) is reduced to its text. Paragraphs of fewer than 12 words are
dropped. Each source file becomes one document (its paragraphs joined by blank lines), up to --max-chars.
Files are taken section by section in a fixed order (tutorial, howto, faq, glossary, using, reference, whatsnew,
library) until about --target-chars characters are collected. Deterministic: same input, same bytes (gzip mtime 0).

    apt-get install python3-doc
    .venv/bin/python scripts/make_human_text.py --out data/sae_human_text.jsonl.gz

Runtime: about 5 s. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SECTIONS = ["tutorial", "howto", "faq", "glossary.rst.txt", "using", "reference", "whatsnew", "library"]

ROLE = re.compile(r":[\w:+-]+:`(?:~|!)?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`name`, :ref:`text <label>`
LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")  # `text <https://...>`_
LITERAL = re.compile(r"``([^`]+)``")
EMPHASIS = re.compile(r"(\*\*|\*)([^*\s][^*]*?)\1")
BARE_REF = re.compile(r"`([^`]+)`_?_?")
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def _inline(text: str) -> str:
    for pattern, repl in ((ROLE, r"\1"), (LINK, r"\1"), (LITERAL, r"\1"), (EMPHASIS, r"\2"), (BARE_REF, r"\1")):
        text = pattern.sub(repl, text)
    text = text.replace("\\", "")
    return " ".join(text.split())


def prose_paragraphs(source: str) -> list[str]:
    """The plain-prose paragraphs of one reST file, markup removed."""
    paragraphs, current = [], []
    skipping_indented = False  # inside a directive's or literal block's indented body
    for line in source.splitlines():
        stripped = line.strip()
        indented = line[:1] in (" ", "\t")
        if skipping_indented:
            if not stripped or indented:
                continue
            skipping_indented = False
        if not stripped:
            if current:
                paragraphs.append(current)
                current = []
            continue
        if stripped.startswith(".."):  # directive, comment, label, substitution: skip it and its body
            if current:
                paragraphs.append(current)
                current = []
            skipping_indented = True
            continue
        if UNDERLINE.match(stripped) or stripped.startswith(("|", "+-", "+=", ">>>", "...")):
            current = []  # a heading's title line (or a table) precedes its underline: drop both
            continue
        if indented and not current:  # an indented block not continuing a paragraph: code, quote, definition
            continue
        current.append(stripped)
        if stripped.endswith("::"):  # "For example::" introduces a literal block
            current[-1] = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
            paragraphs.append(current)
            current = []
            skipping_indented = True
    if current:
        paragraphs.append(current)

    kept = []
    for lines in paragraphs:
        if lines[0].startswith(("* ", "- ", "#. ")) or re.match(r"^\d+\.\s", lines[0]):
            lines = [lines[0][2:].lstrip(". ")] + lines[1:]  # a list item: keep its text
        text = _inline(" ".join(lines))
        words = text.split()
        letters = sum(ch.isalpha() for ch in text)
        if len(words) >= 12 and letters > 0.7 * len(text.replace(" ", "")) and text.isascii():
            kept.append(text)
    return kept


def files_in_order(root: Path) -> list[Path]:
    files: list[Path] = []
    for section in SECTIONS:
        path = root / section
        files += [path] if path.is_file() else sorted(path.rglob("*.rst.txt"))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sae_human_text.jsonl.gz")
    parser.add_argument("--target-chars", type=int, default=1_500_000)
    parser.add_argument("--max-chars", type=int, default=12_000, help="at most this many characters per document")
    parser.add_argument("--sources", default=str(SOURCES))
    args = parser.parse_args()

    root = Path(args.sources)
    if not root.is_dir():
        raise SystemExit(f"{root} is missing: apt-get install python3-doc")
    documents, total = [], 0
    for path in files_in_order(root):
        paragraphs = prose_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        text = ""
        for paragraph in paragraphs:
            if len(text) + len(paragraph) > args.max_chars:
                break
            text += ("\n\n" if text else "") + paragraph
        if len(text) < 400:
            continue
        documents.append({"id": len(documents), "source": f"python-3.11-docs/{path.relative_to(root)}",
                          "text": text})
        total += len(text)
        if total >= args.target_chars:
            break

    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as file:
        for document in documents:
            file.write((json.dumps(document, ensure_ascii=False) + "\n").encode("utf-8"))
    Path(args.out).write_bytes(buffer.getvalue())
    print(f"{len(documents)} documents, {total:,} characters -> {args.out} ({len(buffer.getvalue()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
