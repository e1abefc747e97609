"""SD3 prompts: the tiny offline ``StableDiffusion3Pipeline`` runs end to end, text-embedding
shards carry SD3's pooled embedding (written, validated, read back, sampled with the prompts),
and ``tools/precompute_text_embeddings.py`` on an SD3 pipeline equals the pipeline's own
``encode_prompt`` bit for bit, pooled part included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from adm_megatron.data import BatchLayout, PromptSampler, SyntheticTextEmbeddings, TextEmbeddingShards, write_embedding_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_sd3_pipeline_renders_images(sd3_pipeline):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
    images = pipe(prompt=["a red cat", "blue sky"], height=32, width=32, num_inference_steps=2,
                  guidance_scale=4.0, max_sequence_length=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3)
    assert abs(images[0] - images[1]).max() > 1e-3  # the prompt reaches the image


def test_pooled_embeddings_round_trip_and_follow_the_sampled_prompts(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(5, 3, 4, generator=g), torch.randn(5, 6, generator=g)
    neg, neg_pooled = torch.randn(3, 4, generator=g), torch.randn(6, generator=g)
    out = write_embedding_shards(str(tmp_path / "e"), [f"p{i}" for i in range(5)], emb, neg, shard_size=2,
                                 pooled=pooled, negative_pooled=neg_pooled)
    src = TextEmbeddingShards(out)
    assert src.pooled_dim == 6
    idx = torch.tensor([4, 0, 3])
    assert torch.equal(src.get_pooled(idx), pooled[idx]) and torch.equal(src.get(idx), emb[idx])
    assert torch.equal(src.negative_pooled(), neg_pooled)
    sampler = PromptSampler(src, BatchLayout(2), seed=3)
    text, _ = sampler.batch(7)
    got, negative = sampler.pooled(7)
    rows = sampler.indices(7)
    assert torch.equal(text, emb[rows]) and torch.equal(got, pooled[rows])
    assert torch.equal(negative, neg_pooled.expand(2, 6))


def test_embeddings_without_pooled_part(tmp_path):
    out = write_embedding_shards(str(tmp_path / "e"), ["a"], torch.zeros(1, 2, 3), torch.zeros(2, 3))
    src = TextEmbeddingShards(out)
    assert src.pooled_dim == 0 and PromptSampler(src, BatchLayout(1), seed=0).pooled(0) is None
    with pytest.raises(ValueError, match=r"index\.json: these embeddings have no pooled part"):
        src.get_pooled(torch.tensor([0]))
    synthetic = SyntheticTextEmbeddings(4, 2, 3, seed=1, pooled_dim=5)
    assert synthetic.get_pooled(torch.tensor([1, 2])).shape == (2, 5)
    assert torch.equal(synthetic.get(torch.tensor([1])), synthetic.get(torch.tensor([1])))


def test_a_pooled_tensor_of_the_wrong_shape_is_named(tmp_path):
    out = write_embedding_shards(str(tmp_path / "e"), ["a", "b"], torch.zeros(2, 2, 3), torch.zeros(2, 3),
                                 pooled=torch.zeros(2, 4), negative_pooled=torch.zeros(4))
    index_path = os.path.join(out, "index.json")
    index = json.load(open(index_path))
    index["pooled_dim"] = 5
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match=r"shard-00000\.safetensors: tensor 'pooled' has shape \[2, 4\]"):
        TextEmbeddingShards(out)
    with pytest.raises(ValueError, match="pooled rows must be given exactly when"):
        write_embedding_shards(str(tmp_path / "f"), ["a"], torch.zeros(1, 2, 3), torch.zeros(2, 3),
                               pooled=torch.zeros(1, 4))


def test_precompute_tool_on_an_sd3_pipeline_matches_its_encode_prompt(sd3_pipeline, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    # prompts cut to CLIP's fixed length were not counted in the summary, which named T5's alone
    prompts = ["a cat walking in the city at night", "red car", "ZEBRA on a blue sea!",
               "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "emb"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "precompute_text_embeddings.py"),
           "--prompts", str(tmp_path / "prompts.txt"), "--encoder", sd3_pipeline, "--out", str(out),
           "--max-length", "24", "--batch-size", "8", "--shard-size", "2", "--dtype", "float32", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    src = TextEmbeddingShards(str(out))
    assert (src.seq_len, src.dim, src.pooled_dim) == (40, 32, 64)
    assert "warning: 1 of 4 prompts are longer than 24 T5 tokens and were cut to them" in result.stderr
    # (the tiny CLIP tokenizer's vocabulary is small: 3 are over its 16 tokens)
    assert ("warning: 3 of 4 prompts are longer than 16 CLIP tokens and were cut to them (the pipeline's CLIP "
            "length is fixed; its T5 part holds up to --max-length)") in result.stderr

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_pipeline)
    with torch.no_grad():  # the same batches as the tool (2 + 2 prompts, then "" alone)
        first, _, first_pooled, _ = pipe.encode_prompt(prompts[:2], None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=24)
        last, _, last_pooled, _ = pipe.encode_prompt(prompts[2:], None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=24)
        negative, _, negative_pooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False,
                                                             max_sequence_length=24)
    assert torch.equal(src.get(torch.arange(4)), torch.cat([first, last]))
    assert torch.equal(src.get_pooled(torch.arange(4)), torch.cat([first_pooled, last_pooled]))
    assert torch.equal(src.negative(), negative[0]) and torch.equal(src.negative_pooled(), negative_pooled[0])


def test_an_sd3_pipeline_without_a_text_part_its_index_lists_is_named_before_loading(sd3_pipeline, tmp_path):
    """It was transformers' traceback naming the pipeline root, not the missing folder."""
    import shutil

    from adm_megatron.data.encode_sd3 import load_sd3_text_pipeline

    broken = tmp_path / "sd3"
    shutil.copytree(sd3_pipeline, broken, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_2"))
    with pytest.raises(FileNotFoundError) as err:
        load_sd3_text_pipeline(str(broken))
    assert str(err.value) == f"{broken}: text_encoder_3/, tokenizer_2/ not found, which its model_index.json lists"
