#!/usr/bin/env python3
"""Plain text of Jane Austen's six novels, for perplexity and FP8 calibration on real text.

Source: Debian's `r-cran-janeaustenr` (the R package janeaustenr, which takes the texts from Project
Gutenberg). The novels (1811-1818) are in the public domain. Install with
`apt-get install -y --no-install-recommends r-cran-janeaustenr`; the data is R's lazy-load database
(data/Rdata.rdx index + Rdata.rdb zlib-compressed objects), read here by a small reader of R's
serialization format; R itself is not run.

Output (deterministic for a given package version):
  <novel>.txt         the novel: lines of a paragraph joined, paragraphs separated by a blank line
  calib.jsonl         calibration rows {"system_prompt", "question"} for `herd calibrate`: paragraphs
                      of --calib-novel (default emma, so calibration never sees the evaluation text)
  calib_text.jsonl    the same paragraphs as {"text"} rows, for `herd quantize --calib-data`
  manifest.json       paragraph / character counts and sha256 of every file

Usage: python scripts/austen_text.py [--out build/austen] [--calib-rows 512]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import struct
import zlib

DATA_DIR = "/usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
SYSTEM_PROMPT = "You are a helpful assistant."


# R's XDR serialization, only what a lazy-load database of character vectors uses
_NIL, _SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC, _REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
_SPECIAL = {254, 253, 242, 241, 251, 247}  # NULL, global / empty / base env, missing arg, base namespace


class RSerialReader:
    """Reads one object of R's serialization format (version 2 or 3, XDR): NULL, symbols,
    pairlists, logical / integer / double / character vectors and lists, with a `names` attribute
    turning a vector into a dict."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer and minimal reader R versions
        if version == 3:
            n = self._int()  # the native encoding's name: length, then bytes
            self.pos += n

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.data, self.pos)[0]
        self.pos += 4
        return v

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
        if kind in _SPECIAL:
            return None
        if kind == _REF:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == _SYM:
            sym = self.read()
            self.refs.append(sym)
            return sym
        if kind == _LIST:
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            head = (tag, self.read())
            return [head] + (self.read() or [])
        if kind == _CHAR:
            n = self._int()
            if n < 0:
                return None  # NA_character_
            s = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if kind not in (_LGL, _INT, _REAL, _STR, _VEC):
            raise ValueError(f"unsupported R object type {kind}")
        n = self._int()
        if kind in (_LGL, _INT, _REAL):
            fmt = "d" if kind == _REAL else "i"
            values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
            self.pos += n * struct.calcsize(fmt)
        else:
            values = [self.read() for _ in range(n)]
        names = dict(self.read()).get("names") if has_attr else None
        return dict(zip(names, values)) if names else values


def read_lazyload_db(data_dir: str = DATA_DIR) -> dict[str, list[str]]:
    """{object name: character vector} from an R package's data/Rdata.rdx + Rdata.rdb."""
    rdx, rdb = os.path.join(data_dir, "Rdata.rdx"), os.path.join(data_dir, "Rdata.rdb")
    if not os.path.isfile(rdx):
        raise SystemExit(f"{rdx} not found: apt-get install -y r-cran-janeaustenr (or pass --data-dir)")
    with open(rdx, "rb") as f:
        index = RSerialReader(gzip.decompress(f.read())).read()  # .rdx is a gzipped RDS file
    with open(rdb, "rb") as f:
        db = f.read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = db[offset:offset + length]
        # each object: 4-byte big-endian uncompressed length, then a zlib stream of R's serialization
        size = struct.unpack(">I", blob[:4])[0]
        raw = zlib.decompress(blob[4:])
        if len(raw) != size:
            raise SystemExit(f"{rdb}: object {name} decompressed to {len(raw)} bytes, expected {size}")
        out[name] = ["" if s is None else s for s in RSerialReader(raw).read()]
    return out


def paragraphs(lines: list[str]) -> list[str]:
    """Hard-wrapped lines -> paragraphs (a blank line ends a paragraph)."""
    paras, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paras.append(" ".join(current))
            current = []
    if current:
        paras.append(" ".join(current))
    return paras


def calibration_rows(paras: list[str], n: int, min_chars: int = 200) -> list[dict]:
    """n evenly spaced long paragraphs as {"system_prompt", "question"} rows."""
    long = [p for p in paras if len(p) >= min_chars]
    if not long:
        raise SystemExit("no paragraph long enough for calibration")
    step = max(1, len(long) // n)
    return [{"system_prompt": SYSTEM_PROMPT, "question": f"Continue this passage:\n\n{p}"}
            for p in long[::step][:n]]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DATA_DIR)
    parser.add_argument("--out", default="build/austen")
    parser.add_argument("--calib-novel", default="emma", choices=NOVELS)
    parser.add_argument("--calib-rows", type=int, default=512)
    args = parser.parse_args(argv)
    texts = read_lazyload_db(args.data_dir)
    missing = [n for n in NOVELS if n not in texts]
    if missing:
        raise SystemExit(f"novels missing from {args.data_dir}: {missing}")
    os.makedirs(args.out, exist_ok=True)
    manifest = {"source": "Debian r-cran-janeaustenr (Project Gutenberg texts, public domain)", "files": {}}
    paras_by_novel = {}
    for name in NOVELS:
        paras = paras_by_novel[name] = paragraphs(texts[name])
        path = os.path.join(args.out, f"{name}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(paras) + "\n")
        manifest["files"][f"{name}.txt"] = {"paragraphs": len(paras), "chars": sum(map(len, paras)),
                                            "sha256": sha256(path)}
    rows = calibration_rows(paras_by_novel[args.calib_novel], args.calib_rows)
    path = os.path.join(args.out, "calib.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    manifest["files"]["calib.jsonl"] = {"rows": len(rows), "novel": args.calib_novel, "sha256": sha256(path)}
    path = os.path.join(args.out, "calib_text.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row["question"].split("\n\n", 1)[1]}) + "\n")
    manifest["files"]["calib_text.jsonl"] = {"rows": len(rows), "novel": args.calib_novel, "sha256": sha256(path)}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    total = sum(v.get("chars", 0) for v in manifest["files"].values())
    print(f"wrote {len(NOVELS)} novels ({total / 1e6:.1f} M characters) and {len(rows)} calibration rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
