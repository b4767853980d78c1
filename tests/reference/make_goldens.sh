#!/usr/bin/env bash
# Regenerates every golden file under tests/data/: sets up the reference venv, then runs each
# tests/reference/make_*.py in sorted order. Usage: bash tests/reference/make_goldens.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup_venv.sh"
py="$here/.venv/bin/python"
cd "$here/../.."  # the repository root, so the scripts' relative paths mean the same for everyone
shopt -s nullglob
scripts=("$here"/make_*.py)
if [ ${#scripts[@]} -eq 0 ]; then
    echo "make_goldens: no tests/reference/make_*.py found" >&2
    exit 1
fi
IFS=$'\n' scripts=($(printf '%s\n' "${scripts[@]}" | LC_ALL=C sort)); unset IFS
for s in "${scripts[@]}"; do
    echo "== $(basename "$s")"
    "$py" "$s"
done
echo "make_goldens: all ${#scripts[@]} scripts done; golden files are in tests/data/"
