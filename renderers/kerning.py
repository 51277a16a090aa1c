"""Pair kerning from a face's OpenType GPOS table.

FreeType's FT_Get_Kerning reads only the legacy 'kern' table, which DejaVu
does not have; its kerning lives in GPOS pair-adjustment lookups. This reads
the lookups of the 'kern' feature with fontTools (format 1 glyph pairs and
format 2 class pairs) and answers x-advance adjustments in font units.
"""

from __future__ import annotations

from functools import lru_cache

from fontTools.ttLib import TTFont


class PairKerning:
    """x-advance adjustment between two glyph ids of one face, in font units."""

    def __init__(self, path: str, index: int = 0) -> None:
        font = TTFont(path, fontNumber=index, lazy=True)
        self.units_per_em: int = font["head"].unitsPerEm
        self._order = {name: gid for gid, name in enumerate(font.getGlyphOrder())}
        self._pairs: dict[tuple[int, int], int] = {}
        self._classes: list[tuple[set[int], dict[int, int], dict[int, int], list[list[int]]]] = []
        if "GPOS" in font:
            self._read(font["GPOS"].table)

    def __call__(self, left: int, right: int) -> int:
        value = self._pairs.get((left, right))
        if value is not None:
            return value
        for coverage, class1, class2, matrix in self._classes:
            if left in coverage:
                return matrix[class1.get(left, 0)][class2.get(right, 0)]
        return 0

    def _read(self, gpos) -> None:
        if gpos.FeatureList is None or gpos.LookupList is None:
            return
        indices = sorted({
            i
            for rec in gpos.FeatureList.FeatureRecord
            if rec.FeatureTag == "kern"
            for i in rec.Feature.LookupListIndex
        })
        for i in indices:
            lookup = gpos.LookupList.Lookup[i]
            for sub in lookup.SubTable:
                if lookup.LookupType == 9:  # extension: the real subtable is inside
                    sub = sub.ExtSubTable
                if getattr(sub, "LookupType", 2) != 2:
                    continue
                if sub.Format == 1:
                    self._read_pairs(sub)
                elif sub.Format == 2:
                    self._read_classes(sub)

    def _gid(self, name: str) -> int:
        return self._order[name]

    def _read_pairs(self, sub) -> None:
        for first, pair_set in zip(sub.Coverage.glyphs, sub.PairSet):
            left = self._gid(first)
            for rec in pair_set.PairValueRecord:
                x = getattr(rec.Value1, "XAdvance", 0) if rec.Value1 else 0
                self._pairs.setdefault((left, self._gid(rec.SecondGlyph)), x or 0)

    def _read_classes(self, sub) -> None:
        coverage = {self._gid(g) for g in sub.Coverage.glyphs}
        class1 = {self._gid(g): c for g, c in sub.ClassDef1.classDefs.items()}
        class2 = {self._gid(g): c for g, c in sub.ClassDef2.classDefs.items()}
        matrix = [
            [(getattr(r.Value1, "XAdvance", 0) or 0) if r.Value1 else 0 for r in rec.Class2Record]
            for rec in sub.Class1Record
        ]
        self._classes.append((coverage, class1, class2, matrix))


@lru_cache(maxsize=16)
def pair_kerning(path: str, index: int = 0) -> PairKerning:
    return PairKerning(path, index)
