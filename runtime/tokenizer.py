"""The LLM's tokenizer, from tokenizer.json with the `tokenizers` library (no transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders

from runtime.errors import ArtifactError, OptionError

# transformers' clean_up_tokenization, applied when the source tokenizer asked for it.
_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]
_STATIC_PREFIX = "abcdef"  # transformers' StopStringCriteria decodes each token behind this


def check_text(text, name: str) -> str:
    """`text` as a tokenizer can take it, or an OptionError naming the argument: a string (not
    bytes or None) that encodes to UTF-8 (no lone surrogates, which undecodable bytes become)."""
    if not isinstance(text, str):
        raise OptionError(f"{name}: a {type(text).__name__}; expected a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OptionError(f"{name}: not valid Unicode text (an unpaired surrogate {text[exc.start]!r} at "
                          f"position {exc.start}); pass text that encodes to UTF-8") from None
    return text


class TextTokenizer:
    """Encodes prompts exactly as transformers' tokenizer does (its special prefix/suffix ids
    are recorded in the manifest) and decodes without special tokens."""

    def __init__(self, path: Path, spec: dict):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise ArtifactError(f"{path}: not a tokenizer file the tokenizers library can read "
                                f"({' '.join(str(exc).split())})") from None
        self.prefix_ids: list[int] = list(spec["prefix_ids"])
        self.suffix_ids: list[int] = list(spec["suffix_ids"])
        self.cleanup = bool(spec.get("clean_up_tokenization_spaces", False))
        # Only a tokenizer whose ids are padded by the runtime itself names these (InstructBLIP's
        # Q-Former tokenizer); the LLM's padding is the family's.
        self.pad_id = int(spec.get("pad_token_id", 0))
        self.padding_side: str = spec.get("padding_side", "right")
        # token_text's static prefix, and its answers: a token's text never changes, so every
        # request (each builds its own StopStrings) shares them. Written without a lock: a dict
        # store of an immutable value is atomic under the GIL, and a race computes a value twice.
        self._static_prefix = self._tok.encode(_STATIC_PREFIX, add_special_tokens=False).tokens
        self._token_texts: dict[int, str | None] = {}
        # Byte-fallback tokens (<0x00>..<0xFF>, LLaMA's): the decoder turns a run of them into one
        # byte string, so a run's text can still change while it grows (see settled_ids).
        byte_ids = (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self._byte_ids = frozenset(i for i in byte_ids if i is not None) \
            if getattr(self._tok.model, "byte_fallback", False) else frozenset()

    def encode(self, text: str) -> list[int]:
        check_text(text, "text")
        return self.prefix_ids + self._tok.encode(text, add_special_tokens=False).ids + self.suffix_ids

    def settled_ids(self, ids: Sequence[int]) -> Sequence[int]:
        """The longest prefix of `ids` whose text no later id can change. With byte fallback a
        trailing run of byte tokens waits for the token after it: the run is decoded as one
        byte string, so "\x14" alone becomes "\ufffd\ufffd" once an invalid byte follows."""
        n = len(ids)
        while n and ids[n - 1] in self._byte_ids:
            n -= 1
        return ids[:n]

    @property
    def rewrites(self) -> tuple[str, ...]:
        """Strings the clean-up rewrites once they are complete (a stream holds back their start)."""
        return tuple(a for a, _ in _CLEANUPS) if self.cleanup else ()

    def token_text(self, token_id: int) -> str | None:
        """One token's own text (None if the id is not in the vocabulary), as transformers'
        StopStringCriteria cleans it: the decoder run on a static prefix's tokens plus this
        token, the prefix's text removed (so a leading-space marker becomes a space)."""
        try:
            return self._token_texts[token_id]
        except KeyError:
            pass
        token = self._tok.id_to_token(token_id)
        decoder = self._tok.decoder
        if token is None or decoder is None:
            text = token
        else:
            text = decoder.decode(self._static_prefix + [token])
            text = text[text.index(_STATIC_PREFIX) + len(_STATIC_PREFIX):]
        self._token_texts[token_id] = text
        return text

    def decode(self, ids: list[int]) -> str:
        return self._clean_up(self._raw_text(ids))

    def _raw_text(self, ids: list[int]) -> str:
        """The decoder's text, before the clean-up (special tokens and unknown ids left out)."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def _clean_up(self, text: str) -> str:
        if self.cleanup:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    def growing_text(self) -> "GrowingText":
        """decode() for one id list that only grows (a stream), a window at a time."""
        return GrowingText(self)


class GrowingText:
    """decode(ids) of a list that only grows, decoding only the ids after an *anchor*: a point
    where the text is known to split, decode(ids[:n]) == decode(ids[:anchor]) + the text of
    ids[anchor:n]. A call costs the ids since the anchor, not the whole list.

    The text of ids[anchor:n] is decoded behind one context token, ids[anchor - 1], whose own
    text is then removed: decoders treat a list's first token specially (Metaspace drops its
    leading space). This holds for the decoders of the supported families, ByteLevel (OPT: bytes
    concatenated, then UTF-8) and Metaspace (T5: per token); with any other decoder, or if the
    context's text is not a prefix of the window's, every call decodes the whole list.

    The anchor moves to the end of the list when the text there splits:
    - the window's new text is not empty and does not end in U+FFFD: the bytes end on a
      character boundary (an incomplete UTF-8 sequence decodes as U+FFFD until it completes);
    - with the clean-up on, that text has 3 or more characters and no space among its last 3:
      every clean-up pattern starts with a space and is at most 4 characters long, and a
      replacement only deletes spaces, so none can span the split and the clean-up of the
      whole text is the clean-up of both parts;
    - the last token's text alone is not empty (special tokens, unknown ids and a lone
      Metaspace "▁" have none): the next window's context must be a token the decoder sees.
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._incremental = isinstance(tokenizer._tok.decoder, (decoders.ByteLevel, decoders.Metaspace))
        self._anchor = 0  # ids[:anchor] decode to self._text
        self._text = ""

    def __call__(self, ids: Sequence[int]) -> str:
        tok, a, n = self._tokenizer, self._anchor, len(ids)
        if not self._incremental or n < a:  # n < a: not one growing list after all
            self._incremental = False
            return tok.decode(list(ids))
        context = [ids[a - 1]] if a else []
        head = tok._raw_text(context)
        window = tok._raw_text(context + list(ids[a:n]))
        if not window.startswith(head):
            self._incremental = False
            return tok.decode(list(ids))
        new = window[len(head):]
        text = self._text + tok._clean_up(new)
        if (new and new[-1] != "\ufffd" and (not tok.cleanup or (len(new) >= 3 and " " not in new[-3:]))
                and tok._raw_text([ids[n - 1]])):
            self._anchor, self._text = n, text
        return text
