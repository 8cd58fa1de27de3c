#!/usr/bin/python3
"""Recompute the cases written by eval_ref_gen with reference implementations:
NLTK's corpus_bleu, and a Python implementation of the SQuAD v1.1 evaluation
logic (normalisation, exact match, token F1) plus an LCS ROUGE-L. Exits 1 on
any disagreement."""
import collections
import json
import math
import re
import string
import sys
import warnings

from nltk.translate.bleu_score import corpus_bleu

PUNCT = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in PUNCT)
    s = ARTICLES.sub(" ", s)
    return " ".join(s.split())


def em(pred, gold):
    return float(normalize(pred) == normalize(gold))


def f1(pred, gold):
    p = normalize(pred).split()
    g = normalize(gold).split()
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0
    precision = 1.0 * same / len(p)
    recall = 1.0 * same / len(g)
    return (2 * precision * recall) / (precision + recall)


def rouge_l(pred, gold):
    p = normalize(pred).split()
    g = normalize(gold).split()
    table = [[0] * (len(g) + 1) for _ in range(len(p) + 1)]
    for i, x in enumerate(p):
        for j, y in enumerate(g):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    lcs = table[len(p)][len(g)]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(g)
    return (2 * prec * rec) / (prec + rec)


failures = []


def check(what, ours, ref, tol, rel=False):
    diff = abs(ours - ref)
    bound = tol * max(abs(ref), 1e-300) if rel else tol
    if not diff <= bound:
        failures.append(f"{what}: ours {ours!r} reference {ref!r}")
    return diff


def main(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    bleu_cases = data["bleu"] + [data["bleu_whole"]]
    kinds = collections.Counter(c["kind"] for c in bleu_cases)
    max_rel, exact = 0.0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, c in enumerate(bleu_cases):
            ref = float(corpus_bleu(c["refs"], c["hyps"]))
            ours = c["bleu"]
            check(f"bleu case {i} ({c['kind']})", ours, ref, 1e-12, rel=True)
            if ref != 0.0:
                max_rel = max(max_rel, abs(ours - ref) / abs(ref))
            elif ours != 0.0:
                failures.append(f"bleu case {i}: ours {ours!r}, NLTK returns 0")
            exact += ours == ref
    nonzero = sum(1 for c in bleu_cases if c["bleu"] > 1e-60)
    tiny = sum(1 for c in bleu_cases if 0 < c["bleu"] <= 1e-60)
    bp_lt1 = sum(1 for c in bleu_cases if c["bp"] < 1)
    print(f"BLEU: {len(bleu_cases)} corpora {dict(kinds)}; {nonzero} clearly nonzero, {tiny} tiny (zero n-gram "
          f"precision), {bp_lt1} with BP < 1; bit-identical {exact}; max relative difference {max_rel:.3g}")
    if nonzero < 20 or tiny < 3 or bp_lt1 < 5:
        failures.append("BLEU cases are not varied enough")

    qa = data["qa"]
    n_em = n_f1_mid = 0
    max_diff = 0.0
    for i, c in enumerate(qa):
        pred, golds = c["pred"], c["golds"]
        if c["norm_pred"] != normalize(pred):
            failures.append(f"qa {i}: normalize({pred!r}) ours {c['norm_pred']!r} reference {normalize(pred)!r}")
        for k, g in enumerate(golds):
            if c["norm_golds"][k] != normalize(g):
                failures.append(f"qa {i}: normalize({g!r}) ours {c['norm_golds'][k]!r} reference {normalize(g)!r}")
            max_diff = max(max_diff, check(f"qa {i} em[{k}]", c["em_each"][k], em(pred, g), 1e-9))
            max_diff = max(max_diff, check(f"qa {i} f1[{k}]", c["f1_each"][k], f1(pred, g), 1e-9))
            max_diff = max(max_diff, check(f"qa {i} rouge_l[{k}]", c["rl_each"][k], rouge_l(pred, g), 1e-9))
        ref_em = max(em(pred, g) for g in golds)
        ref_f1 = max(f1(pred, g) for g in golds)
        ref_rl = max(rouge_l(pred, g) for g in golds)
        max_diff = max(max_diff, check(f"qa {i} em", c["em"], ref_em, 1e-9))
        max_diff = max(max_diff, check(f"qa {i} f1", c["f1"], ref_f1, 1e-9))
        max_diff = max(max_diff, check(f"qa {i} rouge_l", c["rouge_l"], ref_rl, 1e-9))
        n_em += ref_em == 1.0
        n_f1_mid += 0 < ref_f1 < 1
    print(f"QA: {len(qa)} cases, {n_em} exact matches, {n_f1_mid} with 0 < F1 < 1; max abs difference {max_diff:.3g}")
    if len(qa) < 60 or n_em < 10 or n_f1_mid < 10:
        failures.append("QA cases are not varied enough")

    for f in failures[:30]:
        print("FAIL", f)
    if failures:
        print(f"{len(failures)} failures")
        return 1
    print("all agree")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
