#!/usr/bin/env bash
# Creates tests/reference/.venv (if missing) with the peer packages of requirements.txt.
# Idempotent: an existing venv that already imports every package is left alone.
# Usage: bash tests/reference/setup_venv.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
py="$venv/bin/python"

if [ ! -x "$py" ]; then
    echo "setup_venv: creating $venv"
    python3 -m venv "$venv" || {
        echo "setup_venv: python3 -m venv failed; install python3-venv (apt-get install python3-venv)" >&2
        exit 1
    }
fi

# Import names of the packages in requirements.txt (Pillow imports as PIL).
if "$py" -c "import torch, transformers, peft, safetensors, sentencepiece, numpy, PIL, torchvision, open_clip, ftfy, regex, cv2, skimage, scipy, sklearn" 2>/dev/null; then
    echo "setup_venv: $venv is ready"
    exit 0
fi

echo "setup_venv: installing $(grep -v '^#' "$here/requirements.txt" | xargs)"
"$py" -m pip install -r "$here/requirements.txt"
"$py" -c "import torch, transformers, peft, safetensors, sentencepiece, numpy, PIL, torchvision, open_clip, ftfy, regex, cv2, skimage, scipy, sklearn"
echo "setup_venv: $venv is ready"
