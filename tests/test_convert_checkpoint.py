"""megatron-core distributed checkpoints and diffusers <-> megatron conversion
(``adm_megatron.convert.checkpoint``, ``tools/convert_checkpoint.py``).

- world of one, in process: diffusers -> megatron -> diffusers is bit exact for the 2b (sin-cos)
  and 5b (RoPE) variants and the result loads with ``from_pretrained`` and gives the same output;
  damaged checkpoints (a shard file deleted or cut short, unreadable metadata), a checkpoint of a
  different architecture and an existing output directory give one-line errors; a failure midway
  leaves no output (and no temporary) directory behind.
- one 2-process world: saved at TP=1 (DP=2) and TP=2; the TP=1 checkpoint loaded at TP=2 puts the
  right slice of every tensor on each rank; the TP=2 checkpoint loaded at TP=1 and at CP=2 equals
  the diffusers weights (and CP=2 gives the same output); a failure on one rank only leaves nothing.
- the CLI: hf-to-megatron in one process, megatron-to-hf of its output under
  ``torchrun --nproc-per-node 2 ... --tensor-parallel 2``; bad arguments and inputs (a damaged
  checkpoint included) exit 2 with one line on stderr, before any process group exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from multiproc import run_world
from tool_scripts import load_tool
from tiny_cogvideox import make_inputs, save_diffusers_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SIZE = (2, 8, 8)  # frames, height, width of the latents: 32 video tokens (CP=2 divides them)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: save_diffusers_model(v, str(root)) for v in ("2b", "5b")}


def _weights(path):
    from adm_megatron.models import read_diffusers_weights

    return read_diffusers_weights(path)


def _assert_same_weights(got: dict, want: dict, context=""):
    assert got.keys() == want.keys(), (context, sorted(set(got) ^ set(want))[:5])
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, (context, name)
        assert torch.equal(got[name], tensor), (context, name)


def _leftovers(parent: str, name: str) -> list[str]:
    """Temporary / moved-aside siblings of ``parent/name`` that the writer may have left."""
    return [e for e in os.listdir(parent) if e.startswith(name + ".")]


def _forward(model, arch):
    latents, text, timestep, rotary, _ = make_inputs(arch, 1, *SIZE)
    with torch.no_grad():
        return model(latents, text, timestep, image_rotary_emb=rotary).sample


# --------------------------------------------------------------------------------------------
# world of one


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_round_trip_is_bit_exact_and_loads_in_diffusers(world_of_one, hf_dirs, variant, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.convert import (
        hf_to_megatron_checkpoint,
        load_megatron_checkpoint,
        megatron_to_hf_checkpoint,
        read_checkpoint_meta,
    )
    from adm_megatron.models import CogVideoXArch

    hf = hf_dirs[variant]
    ckpt, back = str(tmp_path / "meg"), str(tmp_path / "hf")
    assert hf_to_megatron_checkpoint(hf, ckpt) == ckpt
    meta = read_checkpoint_meta(ckpt)
    assert meta["format_version"] == 1 and meta["model"] == "cogvideox"
    assert meta["saved_layout"] == {"world_size": 1, "tensor_parallel": 1, "context_parallel": 1}
    arch = CogVideoXArch.from_pretrained_dir(hf)
    assert CogVideoXArch.from_diffusers_config(meta["diffusers_config"]) == arch

    megatron_to_hf_checkpoint(ckpt, back)
    _assert_same_weights(_weights(back), _weights(hf), variant)
    assert sorted(os.listdir(tmp_path)) == ["hf", "meg"]  # no temporaries left

    original = CogVideoXTransformer3DModel.from_pretrained(hf)
    converted = CogVideoXTransformer3DModel.from_pretrained(back)
    drop = ("_name_or_path",)
    assert {k: v for k, v in converted.config.items() if k not in drop} == {
        k: v for k, v in original.config.items() if k not in drop
    }
    want, got = _forward(original, arch), _forward(converted, arch)
    assert torch.equal(got, want)
    # and the megatron model read back from the checkpoint computes the same (to fp32 rounding)
    ours = _forward(load_megatron_checkpoint(ckpt), arch)
    assert (ours - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_pipeline_directory_converts_as_its_transformer(world_of_one, cogvideox_pipeline, tmp_path):
    from adm_megatron.convert import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    ckpt, back = str(tmp_path / "meg"), str(tmp_path / "hf")
    hf_to_megatron_checkpoint(cogvideox_pipeline, ckpt)  # as model.teacher takes it
    megatron_to_hf_checkpoint(ckpt, back)
    _assert_same_weights(_weights(back), _weights(os.path.join(cogvideox_pipeline, "transformer")), "pipeline")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_round_trips_in_its_own_dtype(world_of_one, hf_dirs, dtype, tmp_path):
    """Converted with the defaults, a bf16 / fp16 diffusers model (as CogVideoX-5b / -2b are published)
    came back as float32: equal values in files twice the size, not the bit-exact round trip the
    README promises. The checkpoint now keeps the weights' own dtype; --dtype still chooses one."""
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.convert import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    half = str(tmp_path / "half")
    CogVideoXTransformer3DModel.from_pretrained(hf_dirs["2b"], torch_dtype=dtype).save_pretrained(half)
    hf_to_megatron_checkpoint(half, str(tmp_path / "meg"))
    megatron_to_hf_checkpoint(str(tmp_path / "meg"), str(tmp_path / "back"))
    _assert_same_weights(_weights(str(tmp_path / "back")), _weights(half), str(dtype))
    hf_to_megatron_checkpoint(half, str(tmp_path / "meg32"), params_dtype=torch.float32)
    megatron_to_hf_checkpoint(str(tmp_path / "meg32"), str(tmp_path / "back32"))
    assert {t.dtype for t in _weights(str(tmp_path / "back32")).values()} == {torch.float32}


def test_a_sharded_save_over_a_single_file_reads_as_diffusers_loads_it(world_of_one, hf_dirs, tmp_path):
    """A fine-tuned transformer saved sharded into its original directory leaves the old single file
    beside the shards; diffusers' from_pretrained reads the shards, and so must the teacher loader,
    the converter and the sampler's checks (the single file won: the run trained on stale weights)."""
    from diffusers import CogVideoXTransformer3DModel

    path = str(tmp_path / "transformer")
    shutil.copytree(hf_dirs["2b"], path)
    model = CogVideoXTransformer3DModel.from_pretrained(path)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(path, max_shard_size="50KB")
    assert os.path.isfile(os.path.join(path, "diffusion_pytorch_model.safetensors"))  # the stale one
    loaded = CogVideoXTransformer3DModel.from_pretrained(path).state_dict()
    _assert_same_weights(_weights(path), loaded, "sharded")


def test_a_lora_generator_checkpoint_loads_with_its_adapters_and_converts_merged(world_of_one, hf_dirs, tmp_path):
    """A LoRA run's generator checkpoint (e.g. a mid-run one) records its adapters' settings; it
    loads back with the same adapters and converts to diffusers with them merged into the weights."""
    from diffusers import CogVideoXTransformer3DModel

    from adm_megatron.config import LoraConfig
    from adm_megatron.convert import (
        load_megatron_checkpoint,
        megatron_to_hf_checkpoint,
        read_checkpoint_meta,
        save_megatron_checkpoint,
    )
    from adm_megatron.lora import apply_lora, lora_adapters
    from adm_megatron.models import build_model_from_hf

    hf = hf_dirs["5b"]
    model = build_model_from_hf(hf)
    config = LoraConfig(rank=2, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "ff.net.2"])
    adapters = apply_lora(model, config, seed=1)
    with torch.no_grad():  # B starts at zero: give every adapter an effect
        for param in adapters.parameters():
            param.normal_(0, 0.3)
    ckpt, hf_out = str(tmp_path / "meg"), str(tmp_path / "hf")
    save_megatron_checkpoint(model, ckpt)
    assert read_checkpoint_meta(ckpt)["lora"] == dataclasses.asdict(config)
    loaded = load_megatron_checkpoint(ckpt)
    assert lora_adapters(loaded) is not None
    for name, param in adapters.state_dict().items():
        assert torch.equal(lora_adapters(loaded).state_dict()[name], param), name
    megatron_to_hf_checkpoint(ckpt, hf_out)
    arch = model.arch
    want = _forward(model, arch)
    merged = _forward(CogVideoXTransformer3DModel.from_pretrained(hf_out), arch)
    base = _forward(CogVideoXTransformer3DModel.from_pretrained(hf), arch)
    assert (merged - want).abs().max() <= 1e-5 * want.abs().max()
    assert (base - want).abs().max() > 1e-3 * want.abs().max()  # the adapters matter


def test_damaged_or_foreign_checkpoints_give_one_line_errors(world_of_one, hf_dirs, tmp_path):
    from adm_megatron.convert import (
        CheckpointError,
        CheckpointNotFoundError,
        hf_to_megatron_checkpoint,
        load_megatron_checkpoint,
    )
    from adm_megatron.models import CogVideoXArch

    ckpt = str(tmp_path / "meg")
    hf_to_megatron_checkpoint(hf_dirs["2b"], ckpt)

    def damaged(name, damage):
        path = str(tmp_path / name)
        shutil.copytree(ckpt, path)
        damage(path)
        with pytest.raises(CheckpointError) as info:
            load_megatron_checkpoint(path)
        message = str(info.value)
        assert "\n" not in message and path in message, message
        return message

    shards = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))
    assert shards, os.listdir(ckpt)
    # megatron-core 0.16 writes two shard files per rank here, 0.17 on one: name whichever tensor
    message = damaged("missing", lambda p: os.remove(os.path.join(p, shards[-1])))
    assert f"shard file {shards[-1]} is missing; it holds tensor '" in message, message

    def cut(path):
        with open(os.path.join(path, shards[0]), "r+b") as f:
            f.truncate(100)

    message = damaged("cut", cut)
    assert f"shard file {shards[0]} is truncated (100 bytes" in message and "tensor '" in message

    def flip(path):  # damaged in place, its length kept: was torch's 'Weights only load failed ... PyTorch 2.6'
        with open(os.path.join(path, shards[0]), "r+b") as f:
            head = f.read(100)
            f.seek(0)
            f.write(bytes(b ^ 0xFF for b in head))

    message = damaged("flipped", flip)
    assert f"shard file {shards[0]} is damaged: the bytes of " in message and message.endswith(
        "in it do not check out, though the file has its full length (bytes in it changed); copy the "
        "checkpoint again"), message

    def garble(path):
        with open(os.path.join(path, ".metadata"), "r+b") as f:
            f.truncate(50)

    assert "unreadable checkpoint metadata" in damaged("garbled", garble)
    message = damaged("no-json", lambda p: os.remove(os.path.join(p, "adm_megatron_checkpoint.json")))
    assert "no adm_megatron_checkpoint.json" in message
    from adm_megatron.mcore_compat import common_state_in_file

    if common_state_in_file(ckpt):  # megatron-core up to 0.18 keeps its common state in common.pt
        message = damaged("no-common", lambda p: os.remove(os.path.join(p, "common.pt")))
        assert message.endswith("no-common: common.pt is missing"), message  # was an AttributeError

        def cut_common(path):
            with open(os.path.join(path, "common.pt"), "r+b") as f:
                f.truncate(200)

        assert "common.pt: unreadable (" in damaged("cut-common", cut_common)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_megatron_checkpoint(str(tmp_path / "nowhere"))

    # a checkpoint of another architecture: 8 heads (hidden 64) read into a 4-head model
    wide_hf = save_diffusers_model("2b", str(tmp_path), seed=3, num_attention_heads=8)
    wide = str(tmp_path / "wide")
    hf_to_megatron_checkpoint(wide_hf, wide)
    narrow = CogVideoXArch.from_pretrained_dir(hf_dirs["2b"])
    with pytest.raises(CheckpointError) as info:
        load_megatron_checkpoint(wide, arch=narrow)
    message = str(info.value)
    assert "\n" not in message
    assert "tensor 'patch_embed.proj.weight' has shape (64, 4, 2, 2) in the checkpoint, the model " \
        "expects (32, 4, 2, 2)" in message, message
    # fewer / more blocks than the model: the first missing (or extra) tensor is named
    deep = dataclasses.replace(narrow, num_layers=3)
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.2\..*' is missing from the checkpoint "
                       r"\(the model expects shape \("):
        load_megatron_checkpoint(ckpt, arch=deep)
    with pytest.raises(CheckpointError, match=r"the checkpoint has tensor 'blocks\.1\..*' that the model "
                       r"does not"):
        load_megatron_checkpoint(ckpt, arch=dataclasses.replace(narrow, num_layers=1))
    # the same when the JSON claims the narrow architecture but the tensors are wide
    liar = str(tmp_path / "liar")
    shutil.copytree(wide, liar)
    meta_path = os.path.join(liar, "adm_megatron_checkpoint.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["diffusers_config"]["num_attention_heads"] = 4
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(CheckpointError, match=r"has shape \(64, 4, 2, 2\) in the checkpoint"):
        load_megatron_checkpoint(liar)


def test_existing_output_and_failures_leave_no_partial_directory(
    world_of_one, hf_dirs, tmp_path, monkeypatch
):
    from megatron.core import dist_checkpointing

    from adm_megatron.convert import (
        CheckpointError,
        hf_to_megatron_checkpoint,
        megatron_to_hf_checkpoint,
    )

    ckpt = str(tmp_path / "meg")
    hf_to_megatron_checkpoint(hf_dirs["2b"], ckpt)
    with pytest.raises(CheckpointError, match="exists and is not empty .*overwrite") as info:
        hf_to_megatron_checkpoint(hf_dirs["5b"], ckpt)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        megatron_to_hf_checkpoint(ckpt, hf_dirs["2b"])
    os.mkdir(tmp_path / "empty")  # an empty directory is fine to write into
    hf_to_megatron_checkpoint(hf_dirs["2b"], str(tmp_path / "empty"))
    assert "adm_megatron_checkpoint.json" in os.listdir(tmp_path / "empty")

    # overwrite replaces the whole directory (the 5b checkpoint, then back from it)
    (tmp_path / "meg" / "stale-file").write_text("x")
    hf_to_megatron_checkpoint(hf_dirs["5b"], ckpt, overwrite=True)
    assert "stale-file" not in os.listdir(ckpt)
    megatron_to_hf_checkpoint(ckpt, str(tmp_path / "hf"))
    _assert_same_weights(_weights(str(tmp_path / "hf")), _weights(hf_dirs["5b"]))

    # a failure after megatron has written the shards: no output, no temporary directory
    real_save = dist_checkpointing.save

    def save_then_fail(sharded, directory, *args, **kwargs):
        real_save(sharded, directory, *args, **kwargs)
        assert any(f.endswith(".distcp") for f in os.listdir(directory))
        raise OSError("injected: disk full")

    monkeypatch.setattr(dist_checkpointing, "save", save_then_fail)
    with pytest.raises(OSError, match="injected"):
        hf_to_megatron_checkpoint(hf_dirs["2b"], str(tmp_path / "failed"))
    # ... nor when replacing an existing checkpoint: the old one stays as it was
    with pytest.raises(OSError, match="injected"):
        hf_to_megatron_checkpoint(hf_dirs["2b"], ckpt, overwrite=True)
    monkeypatch.undo()
    assert not os.path.exists(tmp_path / "failed")
    assert _leftovers(str(tmp_path), "failed") == [] and _leftovers(str(tmp_path), "meg") == []
    megatron_to_hf_checkpoint(ckpt, str(tmp_path / "hf-again"))
    _assert_same_weights(_weights(str(tmp_path / "hf-again")), _weights(hf_dirs["5b"]))

    # the diffusers writer failing midway
    from diffusers import CogVideoXTransformer3DModel

    def half_save(self, directory, **kwargs):
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write("{")
        raise RuntimeError("injected: killed while writing")

    monkeypatch.setattr(CogVideoXTransformer3DModel, "save_pretrained", half_save)
    with pytest.raises(RuntimeError, match="injected"):
        megatron_to_hf_checkpoint(ckpt, str(tmp_path / "hf-failed"))
    assert not os.path.exists(tmp_path / "hf-failed")
    assert _leftovers(str(tmp_path), "hf-failed") == []


# --------------------------------------------------------------------------------------------
# one 2-process world, several layouts


def _layouts_world(hf_dirs: dict, work: str) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from adm_megatron.convert import (
        hf_to_megatron_checkpoint,
        load_megatron_checkpoint,
        megatron_to_hf_checkpoint,
    )
    from adm_megatron.convert.cogvideox_mapping import hf_to_megatron, megatron_to_hf
    from adm_megatron.models import CogVideoXArch, read_diffusers_weights
    from adm_megatron.models.weights import gather_full_state_dict
    from adm_megatron.parallel import destroy_parallel, initialize_parallel

    arch = {v: CogVideoXArch.from_pretrained_dir(p) for v, p in hf_dirs.items()}
    hf_weights = {v: read_diffusers_weights(p) for v, p in hf_dirs.items()}
    full = {v: hf_to_megatron(w, arch[v].num_attention_heads) for v, w in hf_weights.items()}

    def plain(state):
        return {k: v.detach() for k, v in state.items() if not k.endswith("_extra_state")}

    result = {}
    # TP=1 (DP=2): write the TP=1 checkpoints; reference output
    info = initialize_parallel(tensor_parallel=1, context_parallel=1)
    rank = info.rank
    for v, path in hf_dirs.items():
        hf_to_megatron_checkpoint(path, f"{work}/{v}-tp1")
    reference_out = _forward(load_megatron_checkpoint(f"{work}/2b-tp1"), arch["2b"])
    destroy_parallel()

    # TP=2: write the TP=2 checkpoints; read the TP=1 ones (each rank its own slices)
    info = initialize_parallel(tensor_parallel=2, context_parallel=1)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for v, path in hf_dirs.items():
        hf_to_megatron_checkpoint(path, f"{work}/{v}-tp2")
        model = load_megatron_checkpoint(f"{work}/{v}-tp1")
        sharded = 0
        for name, param in model.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state"):
                continue
            want = full[v][name]
            if getattr(param, "tensor_model_parallel", False):
                want = want.chunk(2, dim=param.partition_dim)[tp_rank]
                sharded += 1
                assert param.shape != full[v][name].shape, name
            assert torch.equal(param.detach(), want), (v, "tp1 -> tp2 shard", name)
        assert sharded >= 6 * arch[v].num_layers  # qkv, proj, fc1, fc2 weights and the biases
        gathered = gather_full_state_dict(model)
        assert gathered.keys() == full[v].keys()
        assert all(torch.equal(gathered[k], full[v][k]) for k in full[v]), v
    megatron_to_hf_checkpoint(f"{work}/5b-tp1", f"{work}/5b-tp1-to-hf-at-tp2")

    # a failure on rank 1 only, after the shards are written: no rank leaves anything behind
    real_save = dist_checkpointing.save

    def save_then_fail_on_rank1(*args, **kwargs):
        real_save(*args, **kwargs)
        if rank == 1:
            raise OSError("injected failure on rank 1")

    dist_checkpointing.save = save_then_fail_on_rank1
    try:
        hf_to_megatron_checkpoint(hf_dirs["2b"], f"{work}/failed")
    except Exception as exc:  # noqa: BLE001
        result["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        dist_checkpointing.save = real_save
    torch.distributed.barrier()
    result["failed_exists"] = os.path.exists(f"{work}/failed")
    destroy_parallel()

    # TP=1 (DP=2) reads the TP=2 checkpoints: exactly the diffusers weights
    initialize_parallel(tensor_parallel=1, context_parallel=1)
    for v in hf_dirs:
        model = load_megatron_checkpoint(f"{work}/{v}-tp2")
        back = megatron_to_hf(plain(model.state_dict()), arch[v].num_attention_heads)
        _assert_same_weights(back, hf_weights[v], f"{v} tp2 -> tp1")
    destroy_parallel()

    # CP=2 reads the TP=2 checkpoint; same weights, same output
    initialize_parallel(tensor_parallel=1, context_parallel=2)
    model = load_megatron_checkpoint(f"{work}/2b-tp2")
    state = plain(model.state_dict())
    assert all(torch.equal(state[k], full["2b"][k]) for k in full["2b"]) and state.keys() == full["2b"].keys()
    out = _forward(model, arch["2b"])
    result["cp2_out_err"] = ((out - reference_out).abs().max() / reference_out.abs().max()).item()
    destroy_parallel()
    return result


def test_checkpoints_move_between_layouts(hf_dirs, tmp_path):
    results = run_world(_layouts_world, 2, hf_dirs, str(tmp_path), timeout_s=240)
    for rank, result in enumerate(results):
        assert result["cp2_out_err"] <= 1e-5, (rank, result)
        assert result["failed_exists"] is False
    assert results[1]["failure"] == "OSError: injected failure on rank 1"
    assert results[0]["failure"].startswith("CheckpointError: writing ") and "another rank" in results[0]["failure"]
    assert _leftovers(str(tmp_path), "failed") == []
    _assert_same_weights(_weights(str(tmp_path / "5b-tp1-to-hf-at-tp2")), _weights(hf_dirs["5b"]))
    # the TP=2 checkpoint stores whole tensors: same names and shapes as the TP=1 one
    from torch.distributed.checkpoint import FileSystemReader

    tp1 = FileSystemReader(str(tmp_path / "2b-tp1")).read_metadata().state_dict_metadata
    tp2 = FileSystemReader(str(tmp_path / "2b-tp2")).read_metadata().state_dict_metadata
    assert tp1.keys() == tp2.keys()
    for key, entry in tp1.items():
        assert getattr(entry, "size", None) == getattr(tp2[key], "size", None), key


# --------------------------------------------------------------------------------------------
# the command line tool


def _cli(*args, torchrun: bool = False, timeout: float = 180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, TOOL, *args]
    if torchrun:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", TOOL, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def test_cli_one_process_and_torchrun(hf_dirs, tmp_path):
    hf = hf_dirs["5b"]
    ckpt, back = str(tmp_path / "meg"), str(tmp_path / "hf")
    run = _cli("hf-to-megatron", "--model", "cogvideox", "--hf-path", hf, "--out", ckpt)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote megatron checkpoint" in run.stdout and "tp=1" in run.stdout
    # the one-process checkpoint read back by two processes at TP=2
    assert os.path.exists(TORCHRUN)
    run = _cli("megatron-to-hf", "--model", "cogvideox", "--ckpt", ckpt, "--out", back,
               "--tensor-parallel", "2", torchrun=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote diffusers model" in run.stdout and "tp=2" in run.stdout
    _assert_same_weights(_weights(back), _weights(hf), "cli")

    assert sorted(os.listdir(tmp_path)) == ["hf", "meg"]


def test_cli_bad_input_exits_2_with_one_line(world_of_one, hf_dirs, tmp_path, capsys):
    from adm_megatron.convert import hf_to_megatron_checkpoint

    ckpt, damaged, out = str(tmp_path / "meg"), str(tmp_path / "damaged"), str(tmp_path / "o")
    hf_to_megatron_checkpoint(hf_dirs["2b"], ckpt)
    shutil.copytree(ckpt, damaged)
    shard = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))[-1]  # how many: megatron-core's choice
    os.remove(os.path.join(damaged, shard))
    cut = str(tmp_path / "cut")  # a diffusers directory whose weight file was copied short
    shutil.copytree(hf_dirs["2b"], cut)
    weights = os.path.join(cut, "diffusion_pytorch_model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 10)
    edited = str(tmp_path / "edited")  # its config.json asks for a block more than its weights hold
    shutil.copytree(hf_dirs["2b"], edited)
    with open(os.path.join(edited, "config.json")) as f:
        hf_config = json.load(f)
    with open(os.path.join(edited, "config.json"), "w") as f:
        json.dump({**hf_config, "num_layers": hf_config["num_layers"] + 1}, f)
    run_dir = tmp_path / "run"  # a training run's layout: checkpoints/latest -> iter_0000002/trainer_state.json
    (run_dir / "checkpoints" / "iter_0000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "iter_0000002" / "trainer_state.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text("iter_0000002\n")
    iteration = run_dir / "checkpoints" / "iter_0000002"
    cases = [
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", cut, "--out", out], f"{weights}: truncated ("),
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", edited, "--out", out],
         f"{edited}: its weights do not match its config: "),  # was a KeyError traceback
        (["megatron-to-hf", "--model", "cogvideox", "--ckpt", str(run_dir), "--out", out],
         f"--ckpt {run_dir}: a training run, not one network's; convert its generator with --ckpt {iteration}/generator "
         f"(the raw weights), or run adm-megatron export --checkpoint {run_dir} (what the run exports: its EMA where it "
         "keeps one)"),
        (["megatron-to-hf", "--model", "cogvideox", "--ckpt", str(iteration), "--out", out],
         f"--ckpt {iteration}: a training checkpoint, not one network's"),
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", str(tmp_path / "nowhere"), "--out", out],
         "--hf-path " + str(tmp_path / "nowhere") + ": no such directory"),
        (["hf-to-megatron", "--model", "sd9", "--hf-path", hf_dirs["2b"], "--out", out],
         "invalid choice: 'sd9'"),
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", hf_dirs["2b"], "--out", out,
          "--tensor-parallel", "2"], "world size 1 is not divisible"),
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", hf_dirs["2b"], "--out", ckpt],
         f"--out: output directory {ckpt} exists and is not empty (pass --overwrite to replace it)"),
        (["megatron-to-hf", "--model", "cogvideox", "--ckpt", ckpt, "--out", ckpt, "--overwrite"],
         f"--out: output {ckpt} is the input {ckpt}: writing it would delete what it is written from"),
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", cut, "--out", str(tmp_path), "--overwrite"],
         f"--out: output {tmp_path} contains the input {cut}: writing it would delete"),
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", cut, "--out", os.path.join(cut, "meg"), "--overwrite"],
         f"--out: output {os.path.join(cut, 'meg')} lies inside the input {cut}: writing it would change what it is "
         "written from"),
        (["megatron-to-hf", "--model", "cogvideox", "--ckpt", str(run_dir / "checkpoints" / "latest"), "--out", out],
         f"a file naming the run's newest checkpoint; give {iteration}/generator"),
        (["megatron-to-hf", "--model", "cogvideox", "--ckpt", hf_dirs["2b"], "--out", out],
         "no adm_megatron_checkpoint.json"),
        (["megatron-to-hf", "--model", "cogvideox", "--ckpt", damaged, "--out", out],
         f"shard file {shard} is missing; it holds tensor '"),
        (["megatron-to-hf", "--model", "cogvideox", "--ckpt", str(run_dir / "checkpoints" / "iter_0000001" / "generator"),
          "--out", out],  # pruned by its run a moment ago
         f"no such directory ({run_dir / 'checkpoints'} holds no iter_0000001: train.keep_checkpoints removes old ones; "
         f"the latest is now {iteration}, or give the run directory {run_dir} for its latest)"),
        (["hf-to-megatron", "--model", "cogvideox", "--hf-path", hf_dirs["2b"], "--out", str(iteration / "meg")],
         f"--out {iteration / 'meg'}: inside {iteration}, whose run removes what is there (pruning old checkpoints, "
         "clearing leftovers at a restart); choose an output outside checkpoints/"),
    ]
    tool = load_tool("convert_checkpoint")
    for i, (args, expected) in enumerate(cases):
        if i < 2:  # as a command: nothing else reaches stderr (import-time warnings, logging)
            run = _cli(*args)
            code, err = run.returncode, run.stderr
        else:  # the same checks in this process (a subprocess each took ~4 s)
            with pytest.raises(SystemExit) as exit_:
                tool.main(args)
            code, err = exit_.value.code, capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (args, err[-2000:])
        assert len(lines) == 1 and expected in lines[0], (args, err)
        assert lines[0].startswith("convert_checkpoint.py: error: "), lines
    assert not os.path.exists(out)
    help_text = _cli("hf-to-megatron", "--help").stdout
    for flag in ("--model", "--hf-path", "--out", "--tensor-parallel", "--context-parallel", "--overwrite"):
        assert flag in help_text
