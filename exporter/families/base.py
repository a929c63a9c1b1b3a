"""What the exporter needs from a family, and the parts every family shares."""

from __future__ import annotations

from exporter.comparison import VALIDATION_PROMPTS, compare, merge_reports, to_numpy
from exporter.hf_model import float_dtype
from exporter.torch_stages import QFormerStage, VisionStage
from runtime.errors import OptionError
from runtime.families import Family, get_family
from runtime.generation.shared_kv_cache import SharedKVCacheDecoder
from runtime.stages import (
    ATTENTION_MASK,
    IMAGE_EMBEDS,
    INPUTS_EMBEDS,
    KV_CACHE_FORMS,
    LOGITS,
    POSITION_IDS,
    QUERY_EMBEDS,
    SEQLENS_K,
    SHARED_HEAD_MULTIPLE,
    TOTAL_SEQUENCE_LENGTH,
    kv_cache_form,
    kv_names,
)


class ExportFamily:
    """Subclasses fill in the LLM side; vision and Q-Former are common to every BLIP-2."""

    name = ""
    # The decoder KV cache forms the family exports (runtime.stages.KV_CACHE_FORMS); a family
    # with more than one records its choice as the manifest's model.kv_cache.
    kv_cache_forms: tuple[str, ...] = ("concat",)
    # What torch.onnx.export holds beside the model while it exports one of the family's LLM
    # stages, per byte of the stage's weights: (graph under 2 GiB, serialized whole; over 2 GiB,
    # one file per tensor). Measured by bench/export_bench.py; exporter/memory_estimate.py.
    trace_copies: tuple[float, float] = (2.85, 0.55)
    # The LLM's modules that transformers keeps in float32 when the model is loaded in float16
    # (the LLM class's `_keep_in_fp32_modules`, matched as transformers matches them: a name
    # component). exporter.loading keeps them float32 under every wrapper class, and the graphs
    # compute them in float32 between casts.
    keep_in_fp32: tuple[str, ...] = ()

    def resolve_kv_cache(self, requested: str, dtype: str, head_dim: int | None) -> str | None:
        """--kv-cache auto|concat|shared -> the form written (None: the family has one form).
        auto: shared for fp32 (the CPU's artifacts: no cache copy per step), concat for fp16
        (the GPU's: TensorRT cannot build GroupQueryAttention, and it is unverified on CUDA here)
        and for heads GroupQueryAttention does not take (SHARED_HEAD_MULTIPLE)."""
        if requested not in ("auto", *KV_CACHE_FORMS):
            raise OptionError(f"unknown --kv-cache '{requested}'; valid: auto, {', '.join(KV_CACHE_FORMS)}")
        if requested not in ("auto", *self.kv_cache_forms):
            raise OptionError(f"--kv-cache {requested}: the {self.name} decoder keeps its cache as "
                              f"{' or '.join(self.kv_cache_forms)} only")
        if len(self.kv_cache_forms) == 1:
            return None
        heads_fit = head_dim % SHARED_HEAD_MULTIPLE == 0
        if requested == "auto":
            return "shared" if dtype == "fp32" and heads_fit else "concat"
        if requested == "shared" and not heads_fit:
            raise OptionError(f"--kv-cache shared: GroupQueryAttention takes heads of a multiple of "
                              f"{SHARED_HEAD_MULTIPLE}, this decoder's are {head_dim}; use --kv-cache concat")
        return requested

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

    def modules(self, hf_model, kv_cache: str | None = None) -> dict:
        """stage name -> torch module, for every stage of the family's specs; `kv_cache`: the
        decoder's form (resolve_kv_cache), None for families with one."""

        return {"vision": VisionStage(hf_model), "qformer": QFormerStage(hf_model),
                **self.llm_modules(hf_model, kv_cache or "concat")}

    def llm_modules(self, hf_model, kv_cache: str = "concat") -> dict:
        raise NotImplementedError

    def example_inputs(self, hf_model, dims: dict) -> dict:
        """stage name -> example input tuple, shaped from the stage specs (batch 2)."""
        import torch


        dtype = float_dtype(hf_model)
        specs = self.runtime.stage_specs(dims)
        # Small distinct sizes for the dynamic dims, so no two dims trace to the same value.
        sizes = {"batch": 2, "sequence": 3, "past_sequence": 4, "total_sequence": 7, "encoder_sequence": 5,
                 "instruction": 6, "cache_capacity": 8}
        out = {}
        for name, spec in specs.items():
            tensors = []
            for t in spec.inputs:
                shape = [d if isinstance(d, int) else dims.get(d, sizes.get(d)) for d in t.shape]
                if t.dtype == "int64":
                    tensors.append(self.example_int(t.name, shape))
                elif t.name == SEQLENS_K:  # the shared cache's prefill: every row `sequence` long
                    tensors.append(torch.full(shape, sizes["sequence"] - 1, dtype=torch.int32))
                elif t.name == TOTAL_SEQUENCE_LENGTH:
                    tensors.append(torch.tensor(sizes["sequence"], dtype=torch.int32))
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
    """A decoder-only family's `decoder` stage in ONNX Runtime vs PyTorch (`dec`: the family's
    torch module of the concat form, the reference arithmetic): a left-padded prefill of
    [query][pad][prompt] on an empty cache, then one cached decode step. A shared-cache graph
    (model.kv_cache) runs through the runtime's own SharedKVCacheDecoder; its cache is compared
    at each row's valid positions."""
    import numpy as np
    import torch


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
    next_ids = prefill[0].argmax(-1)
    step_embeds = hf_model.get_input_embeddings()(next_ids)[:, None, :]
    step_mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
    step_pos = step_mask.sum(-1, keepdim=True) - 1
    step = dec(step_embeds, step_mask, step_pos, *prefill[1:])

    names = [LOGITS, *kv_names(layers, "present")]
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    run = _run_shared if kv_cache_form(model) == "shared" else _run_concat
    refs, gots = run(runners["decoder"], names, model, np_dtype, hf_model,
                     (embeds, mask, pos, prefill), (step_embeds, step_mask, step_pos, next_ids, step))
    report = compare("decoder", refs[0], gots[0], atol)
    return merge_reports(report, compare("decoder", refs[1], gots[1], atol), "step.")


def _run_concat(runner, names, model, np_dtype, hf_model, first, second):
    """The concat graph on the reference's own inputs: ([prefill, step] expected, [..] actual)."""
    import numpy as np


    (embeds, mask, pos, prefill), (step_embeds, step_mask, step_pos, _, step) = first, second
    past = kv_names(model["num_layers"], "past")
    b, heads, hd = embeds.shape[0], model.get("num_kv_heads", model["num_heads"]), model["head_dim"]
    feeds = {INPUTS_EMBEDS: embeds.numpy(), ATTENTION_MASK: mask.numpy(), POSITION_IDS: pos.numpy(),
             **{n: np.zeros((b, heads, 0, hd), np_dtype) for n in past}}
    got_prefill = runner.infer(feeds)
    feeds = {INPUTS_EMBEDS: step_embeds.numpy(), ATTENTION_MASK: step_mask.numpy(), POSITION_IDS: step_pos.numpy(),
             **{n: t.numpy().astype(np_dtype) for n, t in zip(past, prefill[1:])}}
    refs = [{n: to_numpy(t) for n, t in zip(names, outs)} for outs in (prefill, step)]
    return refs, [got_prefill, runner.infer(feeds)]


def _run_shared(runner, names, model, np_dtype, hf_model, first, second):
    """The shared-cache graph through the runtime's decoder; each cache entry compared as every
    row's valid positions, in order (the reference's padded layout has them between padding).
    `runner`: a RecordingRunner (the decoder drives the session itself, later)."""
    import numpy as np

    (embeds, mask, _, prefill), (_, step_mask, _, next_ids, step) = first, second
    table = hf_model.get_input_embeddings().weight.detach().numpy().astype(np_dtype)
    keeps = (mask.numpy().astype(bool), step_mask.numpy().astype(bool))
    embeds, mask, next_ids = embeds.numpy(), mask.numpy(), next_ids.numpy()

    def valid(entries, keep):  # (B, H, T, hd) per entry -> each row's kept positions, rows concatenated
        return [np.concatenate([e[r][:, keep[r]] for r in range(len(keep))], axis=1) for e in entries]

    def run(session):  # [prefill outputs, step outputs], each the logits and the cache's valid positions
        decoder = SharedKVCacheDecoder(session, table, model, np_dtype)

        def cache():  # the decoder's buffers at each row's valid positions
            return valid(decoder._arrays(), [np.arange(decoder.capacity) < n for n in decoder.lengths])

        return [dict(zip(names, [logits(), *cache()])) for logits in
                (lambda: decoder.prefill(embeds, mask), lambda: decoder.step(next_ids))]

    refs = [dict(zip(names, [to_numpy(outs[0]), *valid([to_numpy(t) for t in outs[1:]], keep)]))
            for outs, keep in zip((prefill, step), keeps)]
    return refs, runner.later(run)
