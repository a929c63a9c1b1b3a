"""Token generation above the decoder graphs: options, greedy/beam/sampled search, logits
processing, stop strings, and the two KV cache forms' decoders."""
