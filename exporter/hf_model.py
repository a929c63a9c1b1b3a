"""Facts read off a loaded transformers BLIP-2 model that the exporter, its families and the
validator all need."""

from __future__ import annotations


def float_dtype(hf_model):
    """The dtype the exported graphs compute in. Not `hf_model.dtype`: that is the first
    parameter's, and transformers keeps the query tokens and Q-Former in fp32."""
    return hf_model.get_input_embeddings().weight.dtype


def generated_from(hf_model, inputs) -> int:
    """Where `generate`'s new tokens start in its output: after the prompt (decoder-only, OPT)
    or after the decoder start token (encoder-decoder, T5)."""
    return 1 if hf_model.config.text_config.is_encoder_decoder else inputs["input_ids"].shape[1]
