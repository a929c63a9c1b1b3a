"""INT8 post-training quantization of the visual stages and weight-only LLM quantization.

Not built yet (see the calibration issue); the package exists so the layout and its import
rules are in place.
"""
