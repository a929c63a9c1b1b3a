"""Backends run one stage: named numpy arrays in, named numpy arrays out.

Decoding, batching, prompts and timing live above them, in the pipeline.
"""
