"""The memory an artifact directory's weights take, from its files (not from a guess).

Each stage's graph file plus its external-data files hold its weights (the graph structure
itself is a few hundred KB at most); ONNX Runtime maps or copies them once per session. The
token embedding table is the runtime's own array. Their sum is the weight memory a device needs
before activations and the KV cache (batch x positions x layers x 2 x num_kv_heads x head_dim
x the float size: `kv_cache_bytes`).

    artifact_weights(manifest) -> {"stages": {name: {"precision", "bytes"}}, "embeddings": bytes, "total": bytes}
"""

from __future__ import annotations

import os

from runtime.artifact.manifest import Manifest


def _size(manifest: Manifest, relative: str, field: str) -> int:
    return os.stat(manifest.path(relative, field)).st_size


def artifact_weights(manifest: Manifest) -> dict:
    """Bytes of each stage's files and of the embedding table, as the manifest lists them."""
    stages = {}
    for name, stage in manifest.stages.items():
        files = [stage["file"], *stage.get("external_data", [])]
        size = sum(_size(manifest, f, f"stages.{name}") for f in files)
        stages[name] = {"precision": stage["precision"], "bytes": size}
    # A retrieval artifact has no LLM, so no embedding table.
    embeddings = manifest.data.get("embeddings")
    emb = _size(manifest, embeddings["file"], "embeddings.file") if embeddings else 0
    return {"stages": stages, "embeddings": emb, "total": emb + sum(s["bytes"] for s in stages.values())}


def kv_cache_bytes(model: dict, positions: int, batch: int = 1, float_bytes: int = 4) -> int:
    """The self-attention KV cache of `positions` positions (queries + prompt + new tokens)."""
    heads = model.get("num_kv_heads", model["num_heads"])
    return batch * positions * model["num_layers"] * 2 * heads * model["head_dim"] * float_bytes


def weights_line(weights: dict) -> str:
    """One line for a report: each stage's MB and precision, the embeddings, the total."""
    parts = [f"{n} {s['bytes'] / 1e6:.1f} ({s['precision']})" for n, s in weights["stages"].items()]
    return (f"weights MB: {', '.join(parts)}, embeddings {weights['embeddings'] / 1e6:.1f}; "
            f"total {weights['total'] / 1e6:.1f}")
