"""The checkpoint's tokenizer, read from local files only.

DeepSeek-OCR ships a `tokenizer.json` (the `tokenizers` library's format); we
load it with `tokenizers` directly, so nothing is ever fetched. BOS and EOS ids
come from the checkpoint's config (0 and 1 in the official one); the `<image>`
placeholder id is looked up in the tokenizer's own vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

IMAGE_TOKEN = "<image>"


class OCRTokenizer:
    """Text <-> ids for the decoder; also a `TokenCounter` (`name`, `count`)."""

    def __init__(self, tokenizer: Tokenizer, *, bos_id: int, eos_id: int, name: str) -> None:
        image_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if image_id is None:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN!r} token")
        self._tok = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.image_id = image_id
        self.name = name

    @classmethod
    def from_dir(cls, path: str | Path, *, bos_id: int = 0, eos_id: int = 1) -> OCRTokenizer:
        """Load `<path>/tokenizer.json`; a missing file raises FileNotFoundError naming it."""
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer in checkpoint directory: {file} is missing")
        return cls(
            Tokenizer.from_file(str(file)),
            bos_id=bos_id,
            eos_id=eos_id,
            name=f"{Path(path).name}/tokenizer.json",
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added (as the reference's `text_encode`)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def count(self, text: str) -> int:
        """Decoder tokens of `text`: the true cost of keeping it as plain text."""
        return len(self.encode(text))
