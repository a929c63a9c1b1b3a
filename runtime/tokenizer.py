"""The LLM's tokenizer, from tokenizer.json with the `tokenizers` library (no transformers)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

# transformers' clean_up_tokenization, applied when the source tokenizer asked for it.
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class TextTokenizer:
    """Encodes prompts exactly as transformers' tokenizer does (its special prefix/suffix ids
    are recorded in the manifest) and decodes without special tokens."""

    def __init__(self, path: Path, spec: dict):
        self._tok = Tokenizer.from_file(str(path))
        self.prefix_ids: list[int] = list(spec["prefix_ids"])
        self.suffix_ids: list[int] = list(spec["suffix_ids"])
        self.cleanup = bool(spec.get("clean_up_tokenization_spaces", False))

    def encode(self, text: str) -> list[int]:
        return self.prefix_ids + self._tok.encode(text, add_special_tokens=False).ids + self.suffix_ids

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=True)
        if self.cleanup:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text
