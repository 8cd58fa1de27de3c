// Checks dsrsq's GPT-2 BPE ids (written by eval_gpt2_gen) against npm
// gpt-3-encoder's own encode(). usage: node gpt2_compare.js GPT2_DIR CASES.json
const fs = require('fs');
const path = require('path');
const enc = require(path.resolve(process.argv[2], 'Encoder.js'));
const data = JSON.parse(fs.readFileSync(process.argv[3], 'utf-8'));
const pat = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
let bad = 0, tokens = 0;
data.texts.forEach((t, i) => {
  const ref = enc.encode(t);
  const ours = data.ids[i];
  tokens += ref.length;
  const refPre = Array.from(t.matchAll(pat)).map(m => m[0]);
  if (JSON.stringify(refPre) !== JSON.stringify(data.pretokens[i])) {
    bad++;
    console.log(`FAIL pretokens of ${JSON.stringify(t)}: ours ${JSON.stringify(data.pretokens[i])} reference ${JSON.stringify(refPre)}`);
  }
  if (JSON.stringify(ref) !== JSON.stringify(ours)) {
    bad++;
    console.log(`FAIL ids of ${JSON.stringify(t)}: ours ${JSON.stringify(ours)} reference ${JSON.stringify(ref)}`);
  }
});
console.log(`${data.texts.length} texts, ${tokens} GPT-2 tokens, ${bad} disagreements`);
process.exit(bad ? 1 : 0);
