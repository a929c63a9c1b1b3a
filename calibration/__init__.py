"""INT8 post-training quantization of the visual stages and weight-only LLM quantization.

`blip2-edge quantize` (calibration.quantize): static INT8 QDQ for the vision and Q-Former stages
(calibration.visual, images from calibration.sources), weight-only INT8/INT4 for the decoder
(calibration.llm), then a fidelity report (calibration.fidelity) and its gates (calibration.gates).
"""
