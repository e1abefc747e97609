"""A tiny LoRA ADM run (``model.lora``) in one process: the generator's base weights are bit-for-bit
unchanged after its updates, its adapters changed, the adapters' AdamW state is the generator's
only optimizer state (numel equal to the adapters'), the EMA follows the adapters only, and a
run resumed from a mid-run checkpoint (adapters and their optimizer state restored from it) goes
on with exactly the same losses and ends with exactly the same adapters. The end-of-run export
(``train.export_lora=both``) writes the merged transformer and the LoRA file, and the real
pipeline with the LoRA file loaded equals the merged transformer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from adm_megatron.config import load_config
from adm_megatron.data.tiny_pipeline import build_tiny_pipeline
from adm_megatron.lora.export import LORA_WEIGHTS
from tiny_cogvideox import make_inputs, rel_err

ITERATIONS = 3
RUN = [
    "data.num_prompts=4", "data.batch_size=2", "data.frames=2", "data.height=4", "data.width=4",
    "distill.generator_steps=2", "distill.delta_t=100", "distill.head_every=1", "distill.head_hidden=16",
    f"train.max_iterations={ITERATIONS}", "train.save_every=1", "train.num_samples=0", "train.ema_decay=0.5",
    "train.export_lora=both", "logging.wandb_mode=disabled", "logging.progress=false",
    "optim.generator.lr=1e-2", "optim.fake_score.lr=1e-3", "optim.discriminator.lr=1e-3",
    "model.lora={rank: 2, alpha: 4, target_modules: [to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2]}",
]


def _losses(rows) -> list[dict]:
    return [{k: v for k, v in row.items() if k.endswith("/loss")} for row in rows]


def _adapters(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.generator.lora.named_parameters()}


def test_lora_adm_run_trains_only_adapters_resumes_exactly_and_exports(tmp_path, world_of_one):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    pipeline_dir = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    first = str(tmp_path / "first")
    trainer = Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={first}", *RUN]))
    generator = trainer.generator
    adapters = generator.lora
    base_before = {n: p.detach().clone() for n, p in generator.named_parameters() if not n.startswith("lora.")}
    adapters_before = _adapters(trainer)
    ema = trainer.ema
    result = trainer.fit()

    for name, param in generator.named_parameters():
        if name.startswith("lora."):
            assert not torch.equal(param, adapters_before[name[len("lora."):]]), name
        else:
            assert torch.equal(param, base_before[name]), name
    optimizer = trainer.trainable["generator"].optimizer.optimizer
    state_numel = sum(s["exp_avg"].numel() for s in optimizer.state.values())
    assert state_numel == sum(s["exp_avg_sq"].numel() for s in optimizer.state.values()) == adapters.numel()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in adapters.parameters()}
    assert set(ema.shadow) == {f"lora.{n}" for n, _ in adapters.named_parameters()}
    adapters_at_end = _adapters(trainer)  # (the EMA was copied in for the export)
    with open(os.path.join(first, "metrics.jsonl")) as f:
        first_losses = _losses(json.loads(line) for line in f)
    assert len(first_losses) == ITERATIONS and all(first_losses)

    # the export: merged transformer and LoRA file, equal through the real pipeline
    assert result.generator_dir == os.path.join(first, "generator")
    inputs = make_inputs(generator.arch, 1, 2, 4, 4)
    latents, text, timestep, rotary, _ = inputs
    merged = CogVideoXTransformer3DModel.from_pretrained(result.generator_dir)
    pipe = CogVideoXPipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(os.path.join(first, "generator_lora"), weight_name=LORA_WEIGHTS)
    with torch.no_grad():
        want = merged(latents, text, timestep, image_rotary_emb=rotary).sample
        got = pipe.transformer(latents, text, timestep, image_rotary_emb=rotary).sample
        teacher = CogVideoXTransformer3DModel.from_pretrained(os.path.join(pipeline_dir, "transformer"))
        assert rel_err(want, teacher(latents, text, timestep, image_rotary_emb=rotary).sample) > 1e-4
    assert rel_err(got, want) <= 1e-5
    destroy_parallel()

    # resume from the checkpoint after iteration 1 in another output_dir
    checkpoint = os.path.join(first, "checkpoints", "iter_0000001")
    resumed = Trainer(load_config(None, [f"model.teacher={pipeline_dir}", f"output_dir={tmp_path / 'second'}",
                                         *RUN, f"train.resume={checkpoint}"]))
    assert resumed.start_iteration == 1
    losses = [_losses([resumed.train_iteration(i)])[0] for i in range(1, ITERATIONS)]
    assert losses == first_losses[1:]
    resumed.ema.copy_to(resumed.generator)
    assert all(torch.equal(p, adapters_at_end[n]) for n, p in _adapters(resumed).items())
    destroy_parallel()

    # a LoRA generator's checkpoint as the teacher: its adapters would train in every copy of it
    from adm_megatron.config import ConfigError

    lora_ckpt = os.path.join(first, "checkpoints", "iter_0000001", "generator")
    with pytest.raises(ConfigError) as err:
        Trainer(load_config(None, [f"model.teacher={lora_ckpt}", f"model.pipeline={pipeline_dir}",
                                   f"output_dir={tmp_path / 'third'}", *RUN]))
    assert str(err.value) == (f"model.teacher={lora_ckpt!r}: a LoRA generator's checkpoint: merge its adapters first "
                              f"(tools/convert_checkpoint.py megatron-to-hf --ckpt {lora_ckpt} --out DIR) and give DIR")
