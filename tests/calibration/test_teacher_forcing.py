"""The fidelity report's teacher forcing decodes a batch of held-out images together; each row
follows its own caption, as it would alone."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.fidelity import _forced_logits, decoder_against, teacher_forced_references
from runtime import synthetic
from runtime.pipeline import Blip2Pipeline


@pytest.mark.parametrize("artifacts", ["toy_artifacts", "t5_tiny_artifacts"])
def test_a_batch_forces_each_row_along_its_own_caption_as_alone(request, artifacts):
    pipe = Blip2Pipeline.from_artifacts(request.getfixturevalue(artifacts))
    images = [im for _, im in synthetic.make_scenes(3, seed=7)]
    captions = [[5, 9, 12, 7], [], [8, 3]]  # unequal lengths, one empty
    inputs = pipe.layout(pipe.encode(images, {}), [pipe.caption_prompt(None)] * 3)
    batched = _forced_logits(pipe, inputs, captions)
    assert [len(r) for r in batched] == [4, 0, 2]
    for i, image in enumerate(images):
        alone = pipe.layout(pipe.encode([image], {}), [pipe.caption_prompt(None)])
        for a, b in zip(_forced_logits(pipe, alone, [captions[i]])[0], batched[i]):
            assert np.argmax(a) == np.argmax(b) and np.abs(a - b).max() <= 1e-3 * max(1.0, np.abs(a).max())
    # The same artifact against itself: every position agrees and costs no divergence.
    report = decoder_against(teacher_forced_references(pipe, images, captions), pipe)
    assert report["positions"] == 6 and report["top1_agreement"] == 1.0 and report["mean_kl"] < 1e-9
