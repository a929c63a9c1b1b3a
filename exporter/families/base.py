"""What the exporter needs from a family, and the parts every family shares."""

from __future__ import annotations

from runtime.families import Family, get_family


class ExportFamily:
    """Subclasses fill in the LLM side; vision and Q-Former are common to every BLIP-2."""

    name = ""

    @property
    def runtime(self) -> Family:
        return get_family(self.name)

    def check(self, config, model: str, dtype: str) -> None:
        """Raises Blip2EdgeError for configurations this family cannot export faithfully."""

    def llm_dims(self, text_config) -> dict:
        raise NotImplementedError

    def model_dims(self, config) -> dict:
        v = config.vision_config
        return {
            "image_size": v.image_size,
            "num_patches": (v.image_size // v.patch_size) ** 2 + 1,
            "vision_hidden": v.hidden_size,
            "num_query_tokens": config.num_query_tokens,
            "image_token_id": config.image_token_index,
            **self.llm_dims(config.text_config),
        }

    def modules(self, hf_model) -> dict:
        """stage name -> torch module, for every stage of the family's specs."""
        from exporter.torch_stages import QFormerStage, VisionStage

        return {"vision": VisionStage(hf_model), "qformer": QFormerStage(hf_model), **self.llm_modules(hf_model)}

    def llm_modules(self, hf_model) -> dict:
        raise NotImplementedError

    def example_inputs(self, hf_model, dims: dict) -> dict:
        """stage name -> example input tuple, shaped from the stage specs (batch 2)."""
        import torch

        from exporter.loading import float_dtype

        dtype = float_dtype(hf_model)
        specs = self.runtime.stage_specs(dims)
        # Small distinct sizes for the dynamic dims, so no two dims trace to the same value.
        sizes = {"batch": 2, "sequence": 3, "past_sequence": 4, "total_sequence": 7, "encoder_sequence": 5}
        out = {}
        for name, spec in specs.items():
            tensors = []
            for t in spec.inputs:
                shape = [d if isinstance(d, int) else dims.get(d, sizes.get(d)) for d in t.shape]
                if t.dtype == "int64":
                    tensors.append(self.example_int(t.name, shape))
                else:
                    tensors.append(torch.randn(*shape, dtype=dtype))
            out[name] = tuple(tensors)
        return out

    def example_int(self, name: str, shape: list):
        """Integer example inputs (masks, positions); all-ones masks by default."""
        import torch

        return torch.ones(*shape, dtype=torch.long)

    def manifest_header(self, hf_model) -> dict:
        """The manifest's architecture and llm_family."""
        return {"architecture": hf_model.config.model_type, "llm_family": self.name}

    def manifest_sections(self, hf_model, processor, float_dtype: str, tmp) -> tuple[dict, list[str]]:
        """The LLM's manifest sections (embedding table, prompts, generation) and the files they
        write into `tmp`."""
        import numpy as np

        table = hf_model.get_input_embeddings().weight.detach().numpy()
        np.save(tmp / "embed_tokens.npy", table.astype(float_dtype))
        sections = {"embeddings": {"file": "embed_tokens.npy", "dtype": float_dtype, "shape": list(table.shape)},
                    "prompts": dict(self.runtime.prompts), "generation": self.generation_defaults(hf_model)}
        return sections, ["embed_tokens.npy"]

    def generation_defaults(self, hf_model) -> dict:
        gc, tc = hf_model.generation_config, hf_model.config.text_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else tc.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = gc.pad_token_id if gc.pad_token_id is not None else tc.pad_token_id
        return {"eos_token_ids": eos, "pad_token_id": pad, "stop_strings": list(self.runtime.stop_strings),
                "max_new_tokens": 30}

    def validate_llm(self, hf_model, processor, runners: dict, query, manifest, atol: float) -> list[dict]:
        """Each LLM stage in ONNX Runtime vs PyTorch on real inputs built from `query`."""
        raise NotImplementedError
