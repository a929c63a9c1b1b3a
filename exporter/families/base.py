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
        return {**self.vision_dims(config), "image_token_id": config.image_token_index,
                **self.llm_dims(config.text_config)}

    @staticmethod
    def vision_dims(config) -> dict:
        """The ViT's and the query tokens' dims, which every BLIP-2 family shares."""
        v = config.vision_config
        return {
            "image_size": v.image_size,
            "num_patches": (v.image_size // v.patch_size) ** 2 + 1,
            "vision_hidden": v.hidden_size,
            "num_query_tokens": config.num_query_tokens,
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
        sizes = {"batch": 2, "sequence": 3, "past_sequence": 4, "total_sequence": 7, "encoder_sequence": 5,
                 "instruction": 6}
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
                    "prompts": dict(self.runtime.prompts),
                    "generation": self.generation_defaults(hf_model, processor.tokenizer)}
        return sections, ["embed_tokens.npy"]

    def generation_defaults(self, hf_model, tokenizer=None) -> dict:
        """eos/pad/stop-string defaults; `tokenizer`: the checkpoint's (families that need its ids)."""
        gc, tc = hf_model.generation_config, hf_model.config.text_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else tc.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = gc.pad_token_id if gc.pad_token_id is not None else tc.pad_token_id
        return {"eos_token_ids": eos, "pad_token_id": pad, "stop_strings": list(self.runtime.stop_strings),
                "max_new_tokens": 30}

    def architecture_sections(self, processor, out) -> tuple[dict, list[str]]:
        """Manifest sections this architecture adds, and the files (relative to `out`, where the
        processor was saved) they name; InstructBLIP: its Q-Former tokenizer."""
        return {}, []

    def validate_qformer(self, hf_model, processor, runner, image_embeds, prompts, atol):
        """(the qformer stage's report, its PyTorch output) on `image_embeds`; BLIP-2's Q-Former
        reads no prompt."""
        from exporter.torch_stages import QFormerStage
        from exporter.validate import compare, to_numpy
        from runtime.stages import IMAGE_EMBEDS, QUERY_EMBEDS

        query = QFormerStage(hf_model)(image_embeds)
        return compare("qformer", {QUERY_EMBEDS: to_numpy(query)},
                       runner.infer({IMAGE_EMBEDS: image_embeds.numpy()}), atol), query

    def validate_llm(self, hf_model, processor, runners: dict, query, manifest, atol: float) -> list[dict]:
        """Each LLM stage in ONNX Runtime vs PyTorch on real inputs built from `query`."""
        raise NotImplementedError


def causal_padding_bias(attention_mask, new: int, dtype):
    """The additive attention mask (B, 1, T, total) of a decoder-only LLM for `new` (T) positions
    after a cache: causal over the new positions, padding masked, with the dtype's minimum as
    transformers' eager attention masks them (a fully masked padded row stays finite)."""
    import torch

    total = attention_mask.shape[1]
    q_pos = torch.arange(total - new, total).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(total).unsqueeze(0)  # (1, total)
    allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def validate_kv_decoder(dec, hf_model, processor, runners: dict, query, manifest, atol: float) -> dict:
    """A decoder-only family's `decoder` stage (torch module `dec`) in ONNX Runtime vs PyTorch: a
    left-padded prefill of [query][pad][prompt] on an empty cache, then one cached decode step."""
    import numpy as np
    import torch

    from exporter.validate import VALIDATION_PROMPTS, compare, merge_reports, to_numpy
    from runtime.stages import ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, POSITION_IDS, kv_names

    dtype = query.dtype
    model = manifest.model
    layers = model["num_layers"]
    tok = processor.tokenizer(list(VALIDATION_PROMPTS), padding=True, return_tensors="pt")
    text = hf_model.get_input_embeddings()(tok["input_ids"])
    embeds = torch.cat([query, text], dim=1)
    mask = torch.cat([torch.ones(query.shape[:2], dtype=torch.long), tok["attention_mask"]], dim=1)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    b, heads, hd = embeds.shape[0], model.get("num_kv_heads", model["num_heads"]), model["head_dim"]
    empty = [torch.zeros(b, heads, 0, hd, dtype=dtype) for _ in range(2 * layers)]
    prefill = dec(embeds, mask, pos, *empty)
    names = [LOGITS, *kv_names(layers, "present")]
    feeds = {INPUTS_EMBEDS: embeds.numpy(), ATTENTION_MASK: mask.numpy(), POSITION_IDS: pos.numpy()}
    feeds.update({n: e.numpy() for n, e in zip(kv_names(layers, "past"), empty)})
    report = compare("decoder", {n: to_numpy(t) for n, t in zip(names, prefill)}, runners["decoder"].infer(feeds), atol)

    next_ids = prefill[0].argmax(-1)
    step_embeds = hf_model.get_input_embeddings()(next_ids)[:, None, :]
    step_mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
    step_pos = step_mask.sum(-1, keepdim=True) - 1
    step = dec(step_embeds, step_mask, step_pos, *prefill[1:])
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    feeds = {INPUTS_EMBEDS: step_embeds.numpy(), ATTENTION_MASK: step_mask.numpy(), POSITION_IDS: step_pos.numpy()}
    feeds.update({n: t.numpy().astype(np_dtype) for n, t in zip(kv_names(layers, "past"), prefill[1:])})
    step_report = compare("decoder", {n: to_numpy(t) for n, t in zip(names, step)}, runners["decoder"].infer(feeds),
                          atol)
    return merge_reports(report, step_report, "step.")
