#!/usr/bin/env bash
# Train a SentencePiece BPE tokenizer for dsrsq.
#   scripts/train_tokenizer.sh INPUT.txt OUT_PREFIX [VOCAB_SIZE=8000] [THREADS=1]
# Writes OUT_PREFIX.model and OUT_PREFIX.vocab. Special pieces (see
# src/data/tokenizer.hpp): <unk>=0 <s>=1 </s>=2 <pad>=3, then the user-defined
# <sep>=4 (context/query separator) and <ans>=5 (answer start).
# Deterministic: fixed seed, no sentence sampling/shuffling, identity
# normalisation, white space kept as is, byte fallback so every UTF-8 string
# round-trips exactly. The vocabulary size is a soft limit (small corpora).
set -euo pipefail
if [[ $# -lt 2 || $# -gt 4 ]]; then
  echo "usage: $0 INPUT.txt OUT_PREFIX [VOCAB_SIZE=8000] [THREADS=1]" >&2
  exit 2
fi
input=$1
prefix=$2
vocab=${3:-8000}
threads=${4:-1}
command -v spm_train >/dev/null || { echo "$0: spm_train not found (apt-get install sentencepiece)" >&2; exit 1; }
[[ -r "$input" ]] || { echo "$0: cannot read input '$input'" >&2; exit 1; }
[[ "$vocab" =~ ^[0-9]+$ ]] && (( vocab >= 300 )) || { echo "$0: VOCAB_SIZE must be an integer >= 300 (byte fallback needs 256 pieces), got '$vocab'" >&2; exit 2; }
mkdir -p "$(dirname "$prefix")"
spm_train \
  --input="$input" --model_prefix="$prefix" --model_type=bpe --vocab_size="$vocab" \
  --hard_vocab_limit=false --character_coverage=1.0 --byte_fallback=true \
  --normalization_rule_name=identity --remove_extra_whitespaces=false --split_digits=true \
  --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=3 --user_defined_symbols='<sep>,<ans>' \
  --input_sentence_size=0 --shuffle_input_sentence=false --random_seed=1234 \
  --num_threads="$threads" --max_sentence_length=16384 --minloglevel=1
echo "wrote $prefix.model"
