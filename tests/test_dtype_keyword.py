"""``from_pretrained``'s dtype keyword as the installed diffusers / transformers take it
(adm_megatron/dtype_keyword.py): the keyword given takes effect, and the renamed one is not the
deprecated one (a FutureWarning at every load on diffusers >= 0.40, transformers 5), while the
oldest versions setup.py allows get the only one they know."""

from __future__ import annotations

import importlib.metadata
import os
import warnings

import pytest
import torch

from adm_megatron.dtype_keyword import dtype_keyword


@pytest.mark.parametrize("dist, version, keyword", [
    ("diffusers", "0.35.0", "torch_dtype"), ("diffusers", "0.39.2", "torch_dtype"), ("diffusers", "0.40.0", "dtype"),
    ("diffusers", "0.42.1", "dtype"), ("diffusers", "1.0.0.dev0", "dtype"), ("transformers", "4.51.3", "torch_dtype"),
    ("transformers", "5.0.0rc1", "dtype"), ("transformers", "5.25.0", "dtype")])
def test_the_keyword_follows_the_release_that_renamed_it(dist, version, keyword, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == dist else "0")
    assert dtype_keyword(dist, torch.float64) == {keyword: torch.float64}


def test_the_installed_libraries_load_in_the_dtype_given_without_a_deprecation(cogvideox_pipeline):
    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transformer = CogVideoXTransformer3DModel.from_pretrained(
            os.path.join(cogvideox_pipeline, "transformer"), **dtype_keyword("diffusers", torch.float64))
        encoder = T5EncoderModel.from_pretrained(os.path.join(cogvideox_pipeline, "text_encoder"),
                                                 **dtype_keyword("transformers", torch.float64))
    assert next(transformer.parameters()).dtype == next(encoder.parameters()).dtype == torch.float64
    assert not [str(w.message) for w in caught if "dtype" in str(w.message)]
