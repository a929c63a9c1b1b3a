"""BLIP-2 OPT: a decoder-only LLM with a KV cache (runtime/families/decoder_only.py).

Layout: [query embeds][left padding][BOS + prompt], as Blip2Processor (left padding) builds it;
one `decoder` graph serves prefill and every step. Positions are learned, so queries + prompt +
new tokens must fit in max_position_embeddings.
"""

from __future__ import annotations

from runtime.families.decoder_only import DecoderOnlyFamily


class OPTFamily(DecoderOnlyFamily):
    name = "opt"
    # BLIP-2's OPT models end a caption at a newline (LAVIS uses "\n" as their end of text).
    stop_strings = ("\n",)


OPT = OPTFamily()
