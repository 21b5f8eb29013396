#!/usr/bin/env python3
"""Build the training and held-out text of the default model from Debian's `bible-kjv-text`.

Source: the King James Version (1611; public domain, copyright long expired) as shipped by the Debian
packages `bible-kjv-text` (the compressed text) and `bible-kjv` (the `bible` program that reads it),
version 4.38. Install with `apt-get install -y bible-kjv`.

Output (deterministic: same package version -> byte-identical files, checked by sha256 in manifest.json):
  verses.jsonl   every verse: {"book", "chapter", "verse", "text"}
  train.jsonl    one document per chapter of the training books: {"ref", "text"} (verses joined as prose)
  heldout.jsonl  the same for the held-out books (never seen in training, used for perplexity)
  chat.jsonl     short chat conversations built from training verses: {"messages": [...]}
  manifest.json  package version, split, counts and sha256 of every file

Usage: python scripts/prepare_default_data.py [--out build/default_model/data]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess

PACKAGE = "bible-kjv-text"
# Whole books kept out of training (narrative, prophecy, epistle) for the held-out perplexity.
HELDOUT_BOOKS = ("Ruth", "Lamentations", "Jonah", "Philippians", "Colossians", "James", "Jude")
SEED = 1611
NUM_CHAT = 6000

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer in the words of the King James Bible.",
    "You are a quiet scribe who answers with a verse.",
)
NAMES = (
    "Moses", "Abraham", "David", "Solomon", "Jesus", "Peter", "Paul", "Noah", "Jacob", "Joseph",
    "Israel", "Egypt", "Jerusalem", "Elijah", "Samuel", "Saul", "Aaron", "Isaac", "Sarah", "Mary",
    "Daniel", "Babylon", "Pharaoh", "Adam", "Joshua", "Gideon", "Samson", "Elisha", "Jeremiah",
    "Isaiah", "Zion", "Judah", "Benjamin", "Esau", "Pilate", "Herod", "Barnabas", "Timothy",
)
TOPICS = (
    "light", "water", "bread", "love", "peace", "wisdom", "the sea", "sheep", "fire", "the king",
    "heaven", "the earth", "mercy", "sin", "faith", "the mountain", "gold", "the temple", "war",
    "the wilderness", "rain", "wine", "the law", "the night", "a shepherd", "the river", "truth",
)
USER_FORMS = {
    "continue": ("Continue this verse: {start}", "Finish the verse: {start}", "{start}"),
    "about": ("Tell me about {x}.", "What does the Bible say about {x}?", "Give me a verse about {x}."),
    "quote": ("Quote {ref}.", "What does {ref} say?", "Recite {ref}."),
}
_VERSE_RE = re.compile(r"^\s+(\d+) (.*)$")
_HEAD_RE = re.compile(r"^(\S.*) (\d+)$")


def dump_bible() -> tuple[str, str]:
    """Run Debian's `bible` reader over the whole text, one verse per line; return (text, version)."""
    exe = shutil.which("bible")
    if exe is None:
        raise SystemExit("the `bible` program is missing: run `apt-get install -y bible-kjv` (Debian/Ubuntu)")
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True,
                             text=True).stdout.strip() or "unknown"
    # -l10000: a line width wider than any verse, so no verse is wrapped
    out = subprocess.run([exe, "-l10000", "gen1:1-rev22:21"], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"})
    return out.stdout, version


def parse_verses(raw: str) -> list[dict]:
    verses, book, chapter = [], None, None
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = _VERSE_RE.match(line)
        if m:
            if book is None:
                raise ValueError(f"verse before any chapter heading: {line!r}")
            text = " ".join(m.group(2).split())
            verses.append({"book": book, "chapter": chapter, "verse": int(m.group(1)), "text": text})
            continue
        h = _HEAD_RE.match(line)
        if not h:
            raise ValueError(f"unexpected line in bible output: {line!r}")
        book, chapter = h.group(1), int(h.group(2))
    return verses


def chapters(verses: list[dict]) -> list[dict]:
    docs: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        docs.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    return [{"ref": f"{b} {c}", "book": b, "text": " ".join(t)} for (b, c), t in docs.items()]


def make_chat(verses: list[dict], rng: random.Random, n: int) -> list[dict]:
    """Single- and two-turn conversations whose answers are KJV verses, so chat replies stay English."""
    by_word: dict[str, list[int]] = {}
    for key in NAMES + TOPICS:
        pat = re.compile(r"\b" + re.escape(key.split()[-1]) + r"\b", re.IGNORECASE if key[0].islower() else 0)
        by_word[key] = [i for i, v in enumerate(verses) if pat.search(v["text"])]

    def turn() -> tuple[str, str]:
        kind = rng.choice(("continue", "continue", "about", "about", "quote"))
        form = rng.choice(USER_FORMS[kind])
        if kind == "about":
            key = rng.choice([k for k in NAMES + TOPICS if by_word[k]])
            i = rng.choice(by_word[key])
            answer = " ".join(v["text"] for v in verses[i:i + rng.choice((1, 1, 2))])
            return form.format(x=key), answer
        v = verses[rng.randrange(len(verses))]
        if kind == "quote":
            return form.format(ref=f"{v['book']} {v['chapter']}:{v['verse']}"), v["text"]
        words = v["text"].split()
        if len(words) < 6:
            return f"Quote {v['book']} {v['chapter']}:{v['verse']}.", v["text"]
        cut = rng.randint(2, max(2, len(words) // 2))
        start = " ".join(words[:cut])
        return form.format(start=start), " ".join(words[cut:])

    convs = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            q, a = turn()
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        convs.append({"messages": msgs})
    return convs


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def prepare(out: str) -> dict:
    raw, version = dump_bible()
    verses = parse_verses(raw)
    books = list(dict.fromkeys(v["book"] for v in verses))
    missing = [b for b in HELDOUT_BOOKS if b not in books]
    if len(verses) != 31102 or missing:
        raise SystemExit(f"unexpected KJV text: {len(verses)} verses (want 31102), missing books {missing}")
    docs = chapters(verses)
    train = [d for d in docs if d["book"] not in HELDOUT_BOOKS]
    heldout = [d for d in docs if d["book"] in HELDOUT_BOOKS]
    train_verses = [v for v in verses if v["book"] not in HELDOUT_BOOKS]
    chat = make_chat(train_verses, random.Random(SEED), NUM_CHAT)
    os.makedirs(out, exist_ok=True)
    files = {
        "verses.jsonl": _write_jsonl(os.path.join(out, "verses.jsonl"), verses),
        "train.jsonl": _write_jsonl(os.path.join(out, "train.jsonl"), train),
        "heldout.jsonl": _write_jsonl(os.path.join(out, "heldout.jsonl"), heldout),
        "chat.jsonl": _write_jsonl(os.path.join(out, "chat.jsonl"), chat),
    }
    manifest = {
        "source": f"Debian package {PACKAGE} {version} (King James Version, public domain)",
        "heldout_books": list(HELDOUT_BOOKS),
        "counts": {"verses": len(verses), "train_chapters": len(train), "heldout_chapters": len(heldout),
                   "train_chars": sum(len(d["text"]) for d in train),
                   "heldout_chars": sum(len(d["text"]) for d in heldout), "chat": len(chat)},
        "sha256": files,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="build/default_model/data", help="output folder")
    args = ap.parse_args()
    print(json.dumps(prepare(args.out), indent=2))


if __name__ == "__main__":
    main()
