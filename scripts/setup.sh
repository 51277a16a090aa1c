#!/usr/bin/env bash
# One-time set-up for a fresh machine: system fonts (and, for the test and bench extras, Chromium and Tesseract), the pinned CPU build of PyTorch, the package.
# Usage: scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "deepseek-ocr,redis"; the test command
# passes "deepseek-ocr,test,redis"). The pinned CPU wheel of PyTorch is installed first, so the
# deepseek-ocr extra's torch range installs nothing more.
# The installs are skipped when nothing they install has changed: build/setup-EXTRAS.stamp holds a
# hash of pyproject.toml, this script, the extras and the interpreter, written after a set-up that
# succeeded; the stamp counts only while this checkout is still installed in editable mode.
# SETUP_FORCE=1 (or removing the stamp) installs again. The Debian packages are always checked (cheap).
set -euo pipefail
extras=${1:-deepseek-ocr,redis}
cd "$(dirname "$0")/.."
root=$(pwd -P)
stamp="build/setup-${extras//,/-}.stamp"

debian=(fonts-dejavu-core fonts-noto-cjk fonts-noto-core)
# the test extras also drive the memory viewer in headless Chromium (Debian's, never a download)
case ",${extras}," in *,test,*) debian+=(chromium chromium-driver) ;; esac
# bench: Tesseract reads pages back in benchmarks/ocr_check.py (the library does not need it)
case ",${extras}," in *,bench,*) debian+=(tesseract-ocr) ;; esac
missing=()
for pkg in "${debian[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

want=$({ cat pyproject.toml scripts/setup.sh; echo "extras=${extras}"; command -v python3
         python3 -VV; } | sha256sum | cut -d' ' -f1)
installed() {  # this checkout installed in editable mode, the pinned torch beside it (no imports)
    (cd / && python3 - "$root" <<'PY'
import importlib.metadata as md, json, os, sys, urllib.parse as up
url = json.loads(md.distribution("optical-memory").read_text("direct_url.json") or "{}")
where = os.path.realpath(up.unquote(up.urlsplit(url.get("url", "")).path))
ok = where == sys.argv[1] and url.get("dir_info", {}).get("editable")
sys.exit(not (ok and md.version("torch").split("+")[0] == "2.13.0"))
PY
    ) >/dev/null 2>&1 && command -v optical-memory >/dev/null
}
if [ "${SETUP_FORCE:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed
then
    echo "set-up: up to date (${stamp}; SETUP_FORCE=1 installs again)"
    exit 0
fi

python3 -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[${extras}]"
mkdir -p build
echo "$want" > "$stamp"
