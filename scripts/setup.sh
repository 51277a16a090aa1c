#!/usr/bin/env bash
# One-time set-up for a fresh machine: system fonts, the pinned CPU build of PyTorch, the package.
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "deepseek-ocr,redis"; the test command
# passes "deepseek-ocr,test,redis"). The pinned CPU wheel of PyTorch is installed first, so the
# deepseek-ocr extra's torch range installs nothing more.
set -euo pipefail
extras=${1:-deepseek-ocr,redis}
cd "$(dirname "$0")/.."

fonts=(fonts-dejavu-core fonts-noto-cjk fonts-noto-core)
missing=()
for pkg in "${fonts[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[${extras}]"
