"""What the manifest records of a checkpoint's processor: the image preprocessing and the
special ids its tokenizer wraps around a prompt."""

from __future__ import annotations

from runtime.errors import Blip2EdgeError
from runtime.preprocess import RESAMPLE_NAMES, Preprocessing


def preprocessing_of(image_processor) -> Preprocessing:
    ip = image_processor
    if not (ip.do_resize and ip.do_rescale and ip.do_normalize):
        raise Blip2EdgeError("the checkpoint's image processor skips resize, rescale or normalise; not supported")
    size = ip.size
    return Preprocessing(size["height"], size["width"], RESAMPLE_NAMES[int(ip.resample)], float(ip.rescale_factor),
                         tuple(float(x) for x in ip.image_mean), tuple(float(x) for x in ip.image_std))


def tokenizer_spec(hf_tokenizer) -> dict:
    """The special ids transformers' tokenizer wraps around a prompt (OPT: BOS before, T5: </s>
    after), checked on a probe text and on the empty prompt."""
    probe = "Question: what is it? Answer:"
    inner = hf_tokenizer.backend_tokenizer.encode(probe, add_special_tokens=False).ids
    full = hf_tokenizer(probe)["input_ids"]
    starts = [i for i in range(len(full) - len(inner) + 1) if full[i:i + len(inner)] == inner]
    prefix, suffix = (full[:starts[0]], full[starts[0] + len(inner):]) if starts else (None, None)
    if not starts or hf_tokenizer("")["input_ids"] != prefix + suffix:
        raise Blip2EdgeError("the tokenizer's special tokens are not a fixed prefix/suffix; not supported")
    return {"file": "tokenizer.json", "prefix_ids": prefix, "suffix_ids": suffix,
            "clean_up_tokenization_spaces": bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False))}
