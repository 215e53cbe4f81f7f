#!/usr/bin/env bash
# Assemble the GPU Space's repository in DIR: this project's files with the Space's own README
# header (sdk: docker), Dockerfile, .dockerignore and .gitattributes (binaries through LFS).
#
#   bash deploy/gpu-space/make.sh /tmp/loraland-gpu-space
#   cd /tmp/loraland-gpu-space && git init -b main && git lfs install --local && git add -A \
#     && git commit -qm "LoRA Land in a box (GPU)" \
#     && git push https://huggingface.co/spaces/USER/NAME main
#
# From a git checkout it takes the tracked files (what a push of HEAD's tree holds, plus tracked
# edits); from a copy without .git (the rehearsal on the GPU host) every file but local state.
set -euo pipefail
dest=${1:?usage: make.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -d "$dest/.git" ]; then  # a clone of the Space: its files go, so deleted ones stay deleted
  git -C "$dest" rm -rq --ignore-unmatch .
elif [ -n "$(ls -A "$dest" 2> /dev/null)" ]; then
  echo "$dest holds files and is not a git clone: give a new or empty folder" >&2
  exit 1
fi
mkdir -p "$dest"
if git -C "$root" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  # tracked files that exist (one deleted in the working tree is left out, as a push would)
  (cd "$root" && git ls-files -z | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
  done | xargs -0 cp --parents -t "$dest")
else
  tar -C "$root" --exclude=.git --exclude=.gpu --exclude=.whl --exclude=out \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.benchmarks \
    --exclude=.venv -cf - . | tar -C "$dest" -xf -
fi
cp "$here/Dockerfile" "$here/.dockerignore" "$here/.gitattributes" "$dest/"
# the Space's header, then the project README's text without its own (Gradio) header
{ cat "$here/README.md"; awk 'seen >= 2 { print } /^---$/ { seen++ }' "$root/README.md"; } \
  > "$dest/README.md"
echo "the GPU Space's repository: $dest ($(find "$dest" -path "$dest/.git" -prune -o -type f -print | wc -l) files)"
