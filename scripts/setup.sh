#!/usr/bin/env bash
# Installs the Debian packages dsrsq needs (only those missing), then configures
# and builds a Release tree. Idempotent. Sourced by ./run and ./test.
#   BUILD_DIR   build folder (default: build)
#   DSRSQ_CMAKE_ARGS  extra CMake arguments
set -euo pipefail

DSRSQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$DSRSQ_ROOT/build}"

DSRSQ_PACKAGES=(
  g++ cmake make pkg-config git
  openmpi-bin libopenmpi-dev
  libhdf5-dev hdf5-tools
  libboost-program-options-dev libboost-test-dev
  libopenblas-openmp-dev
  nlohmann-json3-dev libsentencepiece-dev sentencepiece
  python3-torch python3-h5py python3-numpy python3-matplotlib python3-pytest python3-nltk
  # a private one-node Slurm for the job scripts' test (scripts/slurm_local.sh, tests/slurm);
  # Debian 12's Slurm 22.05 has the PMIx plugin (srun --mpi=list: pmix, pmix_v4)
  slurmctld slurmd slurm-client munge
)

dsrsq_install_packages() {
  local missing=()
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]})); then
    echo "== installing ${#missing[@]} missing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

dsrsq_build() {
  echo "== configuring $BUILD_DIR"
  cmake -S "$DSRSQ_ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${DSRSQ_CMAKE_ARGS:-}
  echo "== building"
  cmake --build "$BUILD_DIR" -j "$(nproc)"
}

# Environment that makes runs repeatable and fast on this class of machine.
dsrsq_env() {
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  # mpirun as root (containers, CI) and more ranks than cores in tests.
  if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
}

# A SentencePiece model trained from the committed public-domain text (SOTU
# addresses, the Constitution, the Declaration): --tokenizer sentencepiece
# --tokenizer_model "$BUILD_DIR/tokenizer/spm.model".
dsrsq_tokenizer() {
  local model="$BUILD_DIR/tokenizer/spm.model"
  [ -f "$model" ] && return 0
  echo "== training the SentencePiece tokenizer ($model)"
  mkdir -p "$BUILD_DIR/tokenizer"
  /usr/bin/python3 - "$DSRSQ_ROOT/datasets" "$BUILD_DIR/tokenizer/corpus.txt" <<'PY'
import json, pathlib, sys
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts = [json.loads(p.read_text())["text"] for p in sorted((root / "sotu").glob("*.json"))]
parts += [p.read_text() for p in sorted((root / "text").glob("*.txt"))]
out.write_text("\n".join(parts))
PY
  "$DSRSQ_ROOT/scripts/train_tokenizer.sh" "$BUILD_DIR/tokenizer/corpus.txt" "$BUILD_DIR/tokenizer/spm" 2000 "$(nproc)" >/dev/null
}

dsrsq_install_packages "${DSRSQ_PACKAGES[@]}"
dsrsq_env
dsrsq_build
dsrsq_tokenizer
