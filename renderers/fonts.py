"""Font discovery and the fallback chain.

Faces come from Debian packages installed by scripts/setup.sh, found at their
known paths under /usr/share/fonts and otherwise through fontconfig
(`fc-match`). Nothing is downloaded or shipped. The chain for body text is
DejaVu Sans, then Noto Sans CJK SC (CJK), then the Noto symbol and math faces
when fonts-noto-core is installed; code uses DejaVu Sans Mono first and role
labels DejaVu Sans Bold.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


class FontNotFoundError(RuntimeError):
    """A required face is not installed; the message names the package that provides it."""


@dataclass(frozen=True)
class FontFile:
    """One face: a font file and, for collections (.ttc), the index of the face in it."""

    path: str
    index: int = 0

    def sha256(self) -> str:
        return _file_sha256(self.path, *_stat_key(self.path))


@dataclass(frozen=True)
class FontSet:
    """The faces a page uses: text, code, role labels, and fallbacks.

    A character missing from a style's face is looked up in DejaVu Sans (`sans`),
    then in `fallbacks` in order.
    """

    sans: FontFile
    mono: FontFile
    label: FontFile
    fallbacks: tuple[FontFile, ...]

    def describe(self) -> list[dict[str, object]]:
        """Every face with its file hash, in slot order (recorded in fingerprints and pages.json)."""
        return [
            {"role": role, "path": f.path, "index": f.index, "sha256": f.sha256()}
            for role, f in self.slots()
        ]

    def slots(self) -> list[tuple[str, FontFile]]:
        return [
            ("sans", self.sans),
            ("mono", self.mono),
            ("label", self.label),
            *(("fallback", f) for f in self.fallbacks),
        ]


# (family for fc-match, known file, face index in the file, Debian package, required)
_DEJAVU = "/usr/share/fonts/truetype/dejavu/"
_NOTO = "/usr/share/fonts/truetype/noto/"
_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
_CJK_SC_INDEX = 2  # faces of the collection: JP, KR, SC, TC, HK, then the Mono variants
_FACES = {
    "sans": ("DejaVu Sans:style=Book", _DEJAVU + "DejaVuSans.ttf", 0, "fonts-dejavu-core", True),
    "mono": ("DejaVu Sans Mono:style=Book", _DEJAVU + "DejaVuSansMono.ttf", 0, "fonts-dejavu-core", True),
    "label": ("DejaVu Sans:style=Bold", _DEJAVU + "DejaVuSans-Bold.ttf", 0, "fonts-dejavu-core", True),
    "cjk": ("Noto Sans CJK SC:style=Regular", _CJK, _CJK_SC_INDEX, "fonts-noto-cjk", True),
    "symbols2": ("Noto Sans Symbols2", _NOTO + "NotoSansSymbols2-Regular.ttf", 0, "fonts-noto-core", False),
    "symbols": ("Noto Sans Symbols", _NOTO + "NotoSansSymbols-Regular.ttf", 0, "fonts-noto-core", False),
    "math": ("Noto Sans Math", _NOTO + "NotoSansMath-Regular.ttf", 0, "fonts-noto-core", False),
    "noto": ("Noto Sans:style=Regular", _NOTO + "NotoSans-Regular.ttf", 0, "fonts-noto-core", False),
}


@lru_cache(maxsize=1)
def discover_fonts() -> FontSet:
    """The installed default faces; raises FontNotFoundError naming the package to install."""
    found = {key: _find(key) for key in _FACES}
    fallbacks = [found["cjk"], found["symbols2"], found["symbols"], found["math"], found["noto"]]
    return FontSet(
        sans=found["sans"],
        mono=found["mono"],
        label=found["label"],
        fallbacks=tuple(f for f in fallbacks if f is not None),
    )


def _find(key: str) -> FontFile | None:
    family, known, index, package, required = _FACES[key]
    if os.path.isfile(known):
        return FontFile(known, index)
    matched = _fc_match(family)
    if matched is not None and Path(matched.path).name == Path(known).name:
        return matched
    if required:
        raise FontNotFoundError(
            f"font {family!r} not found (looked for {known} and asked fc-match); "
            f"install the Debian package {package} (scripts/setup.sh does)"
        )
    return None


def _fc_match(family: str) -> FontFile | None:
    if shutil.which("fc-match") is None:
        return None
    try:
        out = subprocess.run(
            ["fc-match", "-f", "%{file}\n%{index}", family],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) < 2 or not os.path.isfile(out[0]):
        return None
    return FontFile(out[0], int(out[1] or 0))


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
