#!/usr/bin/env bash
# The codegen2-mini recipe: build a corpus from the permissively licensed Python on this machine (the standard
# library and installed packages, filtered by license), then train with the CodeGen2 objective.
#
#   recipes/codegen2-mini/run.sh OUT_DIR [section.key=value ...]      # e.g. optim.max_steps=3000
#   CORPUS_ONLY=1 recipes/codegen2-mini/run.sh OUT_DIR                 # only the corpus
#
# Rerunning resumes: the corpus is kept once built, and `codegen2 train` continues from the newest checkpoint.
set -euo pipefail
PY=${PYTHON:-python3}
out=${1:?usage: run.sh OUT_DIR [section.key=value ...]}
shift
here=$(cd "$(dirname "$0")" && pwd)
read -r stdlib purelib < <($PY -c 'import sysconfig; p = sysconfig.get_paths(); print(p["stdlib"], p["purelib"])')
sources=(--source "$stdlib")
case "$purelib" in "$stdlib"/*) ;; *) sources+=(--source "$purelib") ;; esac  # a venv's site-packages
if [ ! -f "$out/corpus/manifest.json" ]; then
  $PY -m codegen2 data build "${sources[@]}" --out "$out/corpus"
fi
[ -n "${CORPUS_ONLY:-}" ] && exit 0
$PY -m codegen2 train --config "$here/train.toml" data.corpus="$out/corpus" run.out_dir="$out/run" "$@"
