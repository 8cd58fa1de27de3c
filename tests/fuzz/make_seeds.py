#!/usr/bin/env python3
"""Seed corpora for the fuzz harnesses, from the committed fixtures and configs.

    tests/fuzz/make_seeds.py OUT   ->  OUT/readers/*, OUT/ini/*

A readers seed is one selector byte (the reader: see fuzz_targets.hpp) and the
file content: one JSONL record per seed (its longest strings shortened so the
seed stays under 4 KiB, the -max_len the README uses), a .story file or the
head of the CSV cut at a row end. An ini seed is a config file as it is.
"""
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
FX = ROOT / "datasets" / "fixtures"
LIMIT = 4000
READERS = {"nq": 0, "eli5": 1, "s2orc": 4, "github": 5, "codesearchnet": 6, "longbench": 7}


def shrink(v, budget):
    if isinstance(v, str):
        return v[:budget]
    if isinstance(v, list):
        return [shrink(x, budget) for x in v[:8]]
    if isinstance(v, dict):
        return {k: shrink(x, budget) for k, x in v.items()}
    return v


def main():
    out = pathlib.Path(sys.argv[1])
    (out / "readers").mkdir(parents=True, exist_ok=True)
    (out / "ini").mkdir(parents=True, exist_ok=True)

    def seed(sel, name, data: bytes):
        (out / "readers" / f"{sel}_{name}").write_bytes(bytes([sel]) + data[:LIMIT])

    for name, sel in READERS.items():
        for f in sorted((FX / name).glob("*.jsonl")):
            for i, line in enumerate(f.read_text().splitlines()):
                if not line.strip():
                    continue
                rec, budget = json.loads(line), 2000
                text = json.dumps(rec)
                while len(text.encode()) > LIMIT and budget > 8:
                    text, budget = json.dumps(shrink(rec, budget)), budget // 2
                seed(sel, f"{f.stem}_{i}.jsonl", text.encode() + b"\n")
    for f in sorted((FX / "cnn_dm" / "stories").glob("*.story")):
        seed(2, f.name, f.read_bytes())
    for f in sorted((FX / "cnn_dm").glob("*.csv")):
        head = f.read_bytes()[:LIMIT]
        head = head[: head.rfind(b"\n") + 1] or head
        seed(3, f.name, head)
        seed(8, f.name, head)
    for f in sorted((ROOT / "configs").glob("*.ini")):
        shutil.copy(f, out / "ini" / f.name)


if __name__ == "__main__":
    main()
