#!/usr/bin/python3
"""Rebuild every committed fixture under datasets/ from the pinned sources.

    datasets/tools/make_fixtures.py CACHE_DIR

CACHE_DIR is what datasets/fetch.sh fills (it needs sotu/ and bsdgames/);
the Constitution and Declaration come from Debian miscfiles 1.5+dfsg-4
(/usr/share/state/us-*.gz, `apt-get install miscfiles`). Deterministic: the
same inputs give byte-identical outputs. Only public-domain text (US
government works) and quiz facts are written; the code fixtures and the
questions are written by the dsrsq authors.
"""
import gzip, hashlib, json, os, re, shutil, sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.dirname(HERE)
cache = sys.argv[1]

def w(path, text):
    path = os.path.join(OUT, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)

def jsonl(path, records):
    w(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

# 1. Plain text haystacks.
const = gzip.open("/usr/share/state/us-constitution.gz", "rt", encoding="utf-8").read()
decl = gzip.open("/usr/share/state/us-declaration.gz", "rt", encoding="utf-8").read()
w("text/us-constitution.txt", const)
w("text/us-declaration.txt", decl)

# 2. SOTU: eight addresses in the original JSON schema, text trimmed at a
# sentence end to at most 30000 characters.
SOTU = ["1790_george_washington_n", "1791_george_washington_n", "1801_thomas_jefferson_dr",
        "1862_abraham_lincoln_r", "1941_franklin_d_roosevelt_d", "1962_john_f_kennedy_d",
        "2009_barack_obama_d", "2021_joseph_r_biden_d"]
sotu = []
for name in SOTU:
    d = json.load(open(os.path.join(cache, "sotu/data", name + ".json"), encoding="utf-8"))
    t = d["text"]
    if len(t) > 30000:
        cut = t.rfind(". ", 0, 30000)
        t = t[: cut + 1]
    d["text"] = t
    sotu.append(d)
    w("sotu/" + name + ".json", json.dumps(d, ensure_ascii=False) + "\n")

# 3. Quiz files, unmodified.
QUIZ = ["pres", "africa", "america", "asia", "europe", "elements", "sov", "state"]
for q in QUIZ:
    src = os.path.join(cache, "bsdgames/usr/share/games/bsdgames/quiz", q)
    os.makedirs(os.path.join(OUT, "quiz"), exist_ok=True)
    shutil.copyfile(src, os.path.join(OUT, "quiz", q))

# Constitution split into (heading, paragraph text) sections.
def const_sections():
    secs, art, cur, body = [], None, None, []
    blocks = [b.strip() for b in re.split(r"\n\s*\n", const) if b.strip()]
    for b in blocks:
        one = " ".join(b.split())
        if re.fullmatch(r"(Article [IVX]+|Amendment [IVX]+.*|Preamble|Section \d+)", one):
            if cur and body: secs.append((cur, " ".join(body)))
            body = []
            if one.startswith("Section"): cur = (art + ", " if art else "") + one
            else: art = one; cur = one
        elif cur:
            body.append(one)
    if cur and body: secs.append((cur, " ".join(body)))
    return secs
SECS = const_sections()
def sec(title):
    for h, t in SECS:
        if h == title: return t
    raise KeyError(title)

fx = "fixtures/"
# 4. Natural Questions (simplified): the document is the Constitution's
# articles as <H1>/<P> tokens; questions written by us, answers are spans.
def nq_record(eid, question, short, yes_no="NONE"):
    toks, cands = [], []
    for h, t in SECS[:12]:
        toks += ["<H1>"] + h.split() + ["</H1>"]
        s = len(toks)
        toks += ["<P>"] + t.split() + ["</P>"]
        cands.append({"start_token": s, "end_token": len(toks), "top_level": True})
    doc = " ".join(toks)
    sw = short.split()
    pos = next(i for i in range(len(toks)) if [x.rstrip(',;.') for x in toks[i:i + len(sw)]] == sw)
    ci = next(i for i, c in enumerate(cands) if c["start_token"] <= pos < c["end_token"])
    c = cands[ci]
    ann = {"annotation_id": eid * 7 + 1,
           "long_answer": {"start_token": c["start_token"], "end_token": c["end_token"], "candidate_index": ci},
           "short_answers": [] if yes_no != "NONE" else [{"start_token": pos, "end_token": pos + len(sw)}],
           "yes_no_answer": yes_no}
    return {"document_text": doc, "long_answer_candidates": cands, "question_text": question,
            "annotations": [ann], "document_url": "https://www.archives.gov/founding-docs/constitution-transcript",
            "example_id": eid}
jsonl(fx + "nq/nq-simplified.jsonl", [
    nq_record(9001, "how many years is the term of a united states senator", "six Years"),
    nq_record(9002, "what is the minimum age to be a member of the house of representatives", "twenty five Years"),
    nq_record(9003, "who has the sole power of impeachment", "the sole Power of Impeachment"),
    nq_record(9004, "does the vice president have a vote in the senate", "no Vote unless they be equally divided", "YES"),
])

# 5. ELI5: title = question, answers = Constitution passages.
jsonl(fx + "eli5/eli5.jsonl", [
    {"q_id": "cq1a01", "title": "How are senators chosen and how long do they serve?", "selftext": "",
     "document": "", "subreddit": "explainlikeimfive",
     "answers": {"a_id": ["cs1a", "cs1b"], "text": [sec("Article I, Section 3")[:900], "Six years, in staggered classes."], "score": [12, 3]},
     "title_urls": {"url": []}, "selftext_urls": {"url": []}, "answers_urls": {"url": []}},
    {"q_id": "cq1a02", "title": "What does the preamble of the constitution actually say?", "selftext": "I keep hearing 'We the People'.",
     "document": "", "subreddit": "explainlikeimfive",
     "answers": {"a_id": ["cp1"], "text": [sec("Preamble")], "score": [7]},
     "title_urls": {"url": []}, "selftext_urls": {"url": []}, "answers_urls": {"url": []}},
    {"q_id": "cq1a03", "title": "Who can declare war in the US?", "selftext": "",
     "document": "", "subreddit": "explainlikeimfive",
     "answers": {"a_id": ["cw1", "cw2"], "text": ["Congress. " + sec("Article I, Section 8")[:600], "The Congress, not the President."], "score": [2, 9]},
     "title_urls": {"url": []}, "selftext_urls": {"url": []}, "answers_urls": {"url": []}},
])

# 6. CNN/DailyMail: SOTU openings as articles; highlights are three sentences
# picked from the article (extractive).
def sents(t): return re.split(r"(?<=[.!?])\s+", t)
stories = []
for d in sotu[:4]:
    ss = sents(d["text"])
    art = ss[:14]
    hl = [art[0], art[5], art[11]]
    sid = hashlib.sha1(("sotu-%d-%s" % (d["year"], d["name"])).encode()).hexdigest()
    stories.append((sid, art, hl))
    body = "\n\n".join(" ".join(art[i:i + 3]) for i in range(0, len(art), 3))
    w(fx + "cnn_dm/stories/%s.story" % sid, body + "\n\n" + "".join("@highlight\n\n%s\n\n" % h for h in hl))
def csvq(s): return '"' + s.replace('"', '""') + '"'
rows = ["id,article,highlights"]
for sid, art, hl in stories:
    body = "\n\n".join(" ".join(art[i:i + 3]) for i in range(0, len(art), 3))
    rows.append(",".join([sid, csvq(body), csvq("\n".join(hl))]))
w(fx + "cnn_dm/cnn_dm.csv", "\r\n".join(rows) + "\r\n")

# 7. S2ORC: the Constitution and the Declaration as "papers".
def s2(pid, title, abstract, secs, bib):
    return {"paper_id": pid, "title": title, "authors": [], "year": 1787, "abstract": abstract,
            "body_text": [{"section": h, "text": t, "cite_spans": cs, "ref_spans": []} for h, t, cs in secs],
            "bib_entries": bib}
art5 = sec("Article V")
cite_txt = "Article I"
art5_c = art5.replace("first Article", "first Article [1]", 1)
p = art5_c.find("[1]")
jsonl(fx + "s2orc/s2orc.jsonl", [
    s2("17870917", "The Constitution of the United States of America", sec("Preamble"),
       [(h, t, []) for h, t in SECS[1:6]] + [("Article V", art5_c, [{"start": p, "end": p + 3, "text": "[1]", "ref_id": "BIBREF0"}])],
       {"BIBREF0": {"ref_id": "b0", "title": "Article I, Section 9", "authors": [], "year": 1787, "venue": "", "link": None}}),
    s2("17760704", "The Declaration of Independence", " ".join(decl.split())[:400].rsplit(" ", 1)[0],
       [("Declaration", " ".join(decl.split())[400:3000], [])], {}),
    s2("17870918", "Amendments to the Constitution", sec("Amendment I"),
       [(h, t, []) for h, t in SECS if h.startswith("Amendment")][1:6], {}),
])

# 8. LongBench: questions over the Constitution and a SOTU address.
cctx = "\n\n".join(h + "\n" + t for h, t in SECS[:20])
jsonl(fx + "longbench/longbench.jsonl", [
    {"input": "How many years is a senator's term?", "context": cctx, "answers": ["six Years"], "length": len(cctx.split()),
     "dataset": "constitution_qa", "language": "en", "all_classes": None, "_id": "lb-0001"},
    {"input": "Which body has the sole power to try all impeachments?", "context": cctx, "answers": ["the Senate"],
     "length": len(cctx.split()), "dataset": "constitution_qa", "language": "en", "all_classes": None, "_id": "lb-0002"},
    {"input": "Who delivered this address?", "context": sotu[0]["text"], "answers": [sotu[0]["name"]],
     "length": len(sotu[0]["text"].split()), "dataset": "sotu_speaker", "language": "en",
     "all_classes": sorted(d["name"] for d in sotu), "_id": "lb-0003"},
])

# 9. Code: small Python modules written by the dsrsq authors (CC0), in The
# Stack / GitHub JSONL and in CodeSearchNet JSONL.
MOD_A = '''"""Tiny text statistics."""


def count_words(text):
    """Return the number of whitespace-separated words in text."""
    return len(text.split())


def longest_line(text):
    """Return the longest line of text (the first one on ties)."""
    best = ""
    for line in text.splitlines():
        if len(line) > len(best):
            best = line
    return best


def vowel_share(text):
    """Return the fraction of letters in text that are vowels."""
    letters = [c for c in text.lower() if c.isalpha()]
    if not letters:
        return 0.0
    return sum(c in "aeiou" for c in letters) / len(letters)
'''
MOD_B = '''def clamp(x, lo, hi):
    """Limit x to the closed interval [lo, hi]."""
    return max(lo, min(hi, x))


def running_mean(values):
    """Yield the mean of the first k values for k = 1, 2, ..."""
    total = 0.0
    for k, v in enumerate(values, 1):
        total += v
        yield total / k
'''
MOD_C = '''#include <stdio.h>

/* Print the first n Fibonacci numbers. */
int main(void) {
  long a = 0, b = 1;
  for (int i = 0; i < 10; ++i) { printf("%ld\\n", a); long t = a + b; a = b; b = t; }
  return 0;
}
'''
jsonl(fx + "github/the_stack.jsonl", [
    {"content": MOD_A, "path": "textstats/stats.py", "repo_name": "dsrsq/fixtures", "lang": "Python", "license": "CC0-1.0", "size": len(MOD_A)},
    {"content": MOD_B, "path": "numeric/util.py", "repo_name": "dsrsq/fixtures", "lang": "Python", "license": "CC0-1.0", "size": len(MOD_B)},
    {"content": MOD_C, "path": "c/fib.c", "repo_name": "dsrsq/fixtures", "lang": "C", "license": "CC0-1.0", "size": len(MOD_C)},
])
def funcs(src):
    out = []
    for m in re.finditer(r'^def (\w+)\(.*?\n(?=\n\n|\Z)', src + "\n\n", re.S | re.M):
        code = m.group(0).rstrip("\n") + "\n"
        doc = re.search(r'"""(.*?)"""', code, re.S).group(1)
        out.append((m.group(1), code, doc))
    return out
csn = []
for path, src in [("textstats/stats.py", MOD_A), ("numeric/util.py", MOD_B)]:
    for name, code, doc in funcs(src):
        csn.append({"repo": "dsrsq/fixtures", "path": path, "func_name": name, "original_string": code,
                    "language": "python", "code": code, "code_tokens": code.split(), "docstring": doc,
                    "docstring_tokens": doc.split(), "sha": "0" * 40, "partition": "test",
                    "url": "https://example.invalid/dsrsq/fixtures/" + path})
jsonl(fx + "codesearchnet/python_test_0.jsonl", csn)
print("ok")
