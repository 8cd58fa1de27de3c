#!/usr/bin/env bash
# Fixture: write a deterministic text corpus and train a small SentencePiece
# model twice with scripts/train_tokenizer.sh; the two models must be equal.
set -euo pipefail
train=$1
dir=$2
mkdir -p "$dir"
awk 'BEGIN {
  srand(11);
  n = split("the quick brown fox jumps over lazy dog alpha beta gamma delta river mountain city context query answer needle haystack key value Paris Berlin", w, " ");
  for (i = 0; i < 4000; i++) {
    line = ""; k = 4 + int(rand() * 16);
    for (j = 0; j < k; j++) line = line w[1 + int(rand() * n)] " ";
    print line "record " i ".";
  }
}' > "$dir/corpus.txt"
# The model stores the trainer flags (input and prefix too), so train with the
# same relative prefix in two folders.
mkdir -p "$dir/again"
(cd "$dir" && bash "$train" "$dir/corpus.txt" test 600)
(cd "$dir/again" && bash "$train" "$dir/corpus.txt" test 600)
cmp "$dir/test.model" "$dir/again/test.model" || { echo "training is not deterministic" >&2; exit 1; }
# Bad arguments must fail.
if bash "$train" "$dir/corpus.txt" "$dir/bad" 12 2>/dev/null; then echo "vocab 12 accepted" >&2; exit 1; fi
if bash "$train" "$dir/missing.txt" "$dir/bad" 600 2>/dev/null; then echo "missing input accepted" >&2; exit 1; fi
echo "fixture ok: $dir/test.model"
