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

    @property
    def rewrites(self) -> tuple[str, ...]:
        """Strings the clean-up rewrites once they are complete (a stream holds back their start)."""
        return tuple(a for a, _ in _CLEANUPS) if self.cleanup else ()

    def token_text(self, token_id: int) -> str | None:
        """One token's own text (None if the id is not in the vocabulary), as transformers'
        StopStringCriteria cleans it: the decoder run on a static prefix's tokens plus this
        token, the prefix's text removed (so a leading-space marker becomes a space)."""
        token = self._tok.id_to_token(token_id)
        if token is None:
            return None
        decoder = self._tok.decoder
        if decoder is None:
            return token
        if not hasattr(self, "_static_prefix"):
            self._static_prefix = self._tok.encode("abcdef", add_special_tokens=False).tokens
        text = decoder.decode(self._static_prefix + [token])
        return text[text.index("abcdef") + len("abcdef"):]

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=True)
        if self.cleanup:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text
