"""Teacher ODE-pair collection (``adm-megatron collect-ode``): the stored pairs reproduce (the
sampler rerun from a stored x_T gives the stored x_0 bit for bit, fp32 CPU), a collection killed
after a shard or in the middle of writing one resumes to exactly the shards of an uninterrupted
collection (no duplicate, no hole), a finished collection is left alone, and bad directories get
one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch

from adm_megatron.config import ConfigError, load_config
from adm_megatron.data.ode_pairs import MANIFEST, OdePairs, shard_name
from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["data.num_prompts=3", "data.frames=2", "data.height=4", "data.width=4", "distill.head_every=1",
        "distill.guidance_scale=[2.0, 4.0]"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("teacher") / "pipe"), seed=0)


def _command(pipeline_dir, out, num_pairs=10, steps=6):
    return [sys.executable, "-m", "adm_megatron.cli", "collect-ode", "--out", str(out),
            "--num-pairs", str(num_pairs), "--shard-size", "4", "--steps", str(steps), "--batch-size", "4",
            "--no-progress", f"model.teacher={pipeline_dir}", *DATA]


def _run(cmd, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def _shards(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))
            if name.startswith("pairs-")}


@pytest.fixture(scope="module")
def reference(pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "pairs"
    result = _run(_command(pipeline_dir, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return str(out)


def test_collection_writes_shards_and_a_manifest(reference):
    pairs = OdePairs(reference)
    assert len(pairs) == 10 and [s["rows"] for s in pairs.shards] == [4, 4, 2]
    manifest = pairs.manifest
    assert manifest["latent_shape"] == [2, 4, 4, 4] and manifest["sampler"]["steps"] == 6
    assert manifest["sampler"]["guidance_scale"] == [2.0, 4.0] and manifest["teacher"]["kind"] == "diffusers"
    assert pairs.verify() == []
    ids = pairs.get(torch.arange(10), "prompt_id")
    assert ids.tolist() == [j % 3 for j in range(10)]
    scales = pairs.get(torch.arange(10), "guidance_scale")
    assert ((2.0 <= scales) & (scales <= 4.0)).all() and scales.unique().numel() == 10


def _large_rows_collection(out) -> str:
    """3 shards of 8 pairs of 2 x 4 x 16 x 16 latents (8 KiB a row), as the collection writes them."""
    from safetensors.torch import save_file

    from adm_megatron.data.ode_pairs import FORMAT, VERSION

    os.makedirs(out)
    g = torch.Generator().manual_seed(0)
    shards = []
    for i in range(3):
        save_file({"x_T": torch.randn(8, 2, 4, 16, 16, generator=g), "x_0": torch.randn(8, 2, 4, 16, 16, generator=g),
                   "prompt_id": torch.arange(8 * i, 8 * i + 8), "guidance_scale": torch.full((8,), 5.0)},
                  os.path.join(out, shard_name(i)))
        shards.append({"file": shard_name(i), "rows": 8})
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "latent_shape": [2, 4, 16, 16], "shards": shards}, f)
    return str(out)


def test_a_batch_reads_its_rows_alone_and_keeps_nothing(tmp_path):
    """Rows come back in the order asked, equal to the shards' rows; reading them holds about a batch
    of memory, not the shards they sit in, and keeps none of it: a long run that touches every shard
    of a large collection stays at a batch of host memory."""
    from adm_megatron.memory.measure import peak_during

    pairs = OdePairs(_large_rows_collection(tmp_path / "pairs"))
    indices = torch.tensor([17, 1, 9, 1])  # shards 2, 0, 1, 0
    shards = [pairs.shard(i) for i in range(3)]
    for key in ("x_T", "x_0", "prompt_id"):
        want = torch.stack([shards[j // 8][key][j % 8] for j in indices.tolist()])
        assert torch.equal(pairs.get(indices, key), want), key
    batch = pairs.get(indices, "x_T").nbytes  # 32 KiB; a shard file is 128 KiB

    def peak(fn) -> int:  # torch's allocator and Python's (numpy's arrays), each measured alone
        tracemalloc.start()
        try:
            fn()
            python = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return max(peak_during(fn), python)

    assert peak(lambda: pairs.get(indices, "x_T")) < 2.5 * batch
    def every_shard_one_row_at_a_time():
        for i in range(3):
            for key in ("x_T", "x_0"):
                pairs.get(torch.tensor([8 * i]), key)

    # a read holds a row and the bookkeeping of its read; keeping what was read would take 48 KiB
    assert peak(every_shard_one_row_at_a_time) < 0.75 * batch


def test_real_samples_come_in_epochs_whatever_the_split_and_resume_exactly(tmp_path):
    """The 24 pairs are drawn in epochs: with a global batch of 6, iterations 0-3 see every pair once
    (they were drawn with replacement: about a third of a collection went unseen per pass over it); a
    split over two ranks and three micro-batches draws the same global batch; a fresh sampler (a
    resumed run) draws what the first drew; and the order is not the prompts' (another stream)."""
    from adm_megatron.data import BatchLayout, PromptSampler, SyntheticTextEmbeddings
    from adm_megatron.data.ode_pairs import RealSampler

    pairs = OdePairs(_large_rows_collection(tmp_path / "pairs"))
    whole = RealSampler(pairs, BatchLayout(6), seed=5)
    epoch = torch.cat([whole.indices(i) for i in range(4)])
    assert sorted(epoch.tolist()) == list(range(24))
    assert not torch.equal(torch.cat([whole.indices(i) for i in range(4, 8)]), epoch)  # the next epoch: another order
    split = [RealSampler(pairs, BatchLayout(1, rank, 2, 3), seed=5) for rank in range(2)]  # 1 row x 2 ranks x 3
    for i in (0, 3, 9):
        slots = [split[rank].indices(i, micro) for micro in range(3) for rank in range(2)]  # slot m x DP + r
        assert torch.equal(torch.cat(slots), whole.indices(i))
    fresh = RealSampler(pairs, BatchLayout(6), seed=5)
    assert all(torch.equal(fresh.indices(i), whole.indices(i)) for i in (7, 2, 7))
    prompts = PromptSampler(SyntheticTextEmbeddings(24, 2, 2), BatchLayout(6), seed=5)
    assert not torch.equal(prompts.indices(0), whole.indices(0))
    x_T, x_0, prompt_id = whole.batch(1)
    assert torch.equal(prompt_id, pairs.get(whole.indices(1), "prompt_id")) and x_T.shape == x_0.shape == (6, 2, 4, 16, 16)


def test_a_truncated_shard_is_refused_when_the_pairs_are_opened(tmp_path):
    """A cut copy of a shard (``truncate -s 1000``) is found from its header when the directory is
    opened, before training, not by a traceback when one of its rows is first read."""
    out = _large_rows_collection(tmp_path / "pairs")
    shard = os.path.join(out, shard_name(1))
    size = os.path.getsize(shard)
    os.truncate(shard, 1000)
    with pytest.raises(ValueError) as err:
        OdePairs(out)
    assert str(err.value) == f"{shard}: truncated (1000 bytes, its header needs {size})"


def test_stored_pairs_reproduce_bit_for_bit(reference, pipeline_dir, tmp_path, world_of_one):
    from adm_megatron.algorithms.networks import DiTFunction
    from adm_megatron.data import open_text_source
    from adm_megatron.models.rotary import cogvideox_rotary_emb
    from adm_megatron.ode_collection import sample_pairs
    from adm_megatron.train.teacher import resolve_teacher

    config = load_config(None, [f"model.teacher={pipeline_dir}", *DATA])
    source = resolve_teacher(pipeline_dir)
    teacher = source.build_models(1)[0].eval()
    fn = DiTFunction(teacher, cogvideox_rotary_emb(source.arch, 2, 4, 4))
    texts = open_text_source("synthetic", "", 3, source.arch.max_text_seq_length, source.arch.text_embed_dim,
                             config.seed)
    pairs = OdePairs(reference)
    shard = pairs.shard(1)
    text = texts.get(shard["prompt_id"])
    negative = texts.negative().unsqueeze(0).expand_as(text)
    with torch.no_grad():
        x0 = sample_pairs(fn, source.schedule(), shard["x_T"], text, negative, shard["guidance_scale"], 6)
    assert torch.equal(x0, shard["x_0"])
    assert not torch.equal(shard["x_0"], shard["x_T"])


def test_killed_collection_resumes_to_the_uninterrupted_shards(pipeline_dir, tmp_path, capsys):
    # a longer collection than the reference fixture's (15 shards of 40 steps): after its first shard
    # there are about two seconds of work left, so the kill below lands before the manifest even when
    # this test process is descheduled for a while on a loaded machine
    reference = tmp_path / "reference"
    longer = dict(num_pairs=60, steps=40)
    assert _run(_command(pipeline_dir, reference, **longer)).returncode == 0
    out = tmp_path / "pairs"
    # kill point 1: a real SIGKILL once the first shard is on disk (before the manifest)
    proc = subprocess.Popen(_command(pipeline_dir, out, **longer), cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / shard_name(0)).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists() and (out / shard_name(0)).exists()
    # kill point 2: killed in the middle of writing shard 2 (a partial temporary file, no shard)
    (out / shard_name(2)).unlink(missing_ok=True)
    (out / f".{shard_name(2)}.tmp-99999").write_bytes(b"partial")
    with pytest.raises(ValueError, match="no manifest.json"):
        OdePairs(str(out))
    kept = os.stat(out / shard_name(0)).st_mtime_ns
    result = _run(_command(pipeline_dir, out, **longer))
    assert os.stat(out / shard_name(0)).st_mtime_ns == kept  # the finished shard was not redone
    assert result.returncode == 0, result.stderr[-2000:]
    assert _shards(out) == _shards(reference)  # no hole, no duplicate, the same bytes
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # the partial file is gone
    assert OdePairs(str(out)).verify() == []
    # a finished collection is left alone; other settings in its directory are refused in one line (both
    # in this process: neither does any work)
    from adm_megatron.cli import main
    from adm_megatron.parallel import destroy_parallel

    before = {n: os.path.getmtime(out / n) for n in os.listdir(out)}
    try:
        assert main(_command(pipeline_dir, out, **longer)[3:]) == 0
        assert before == {n: os.path.getmtime(out / n) for n in os.listdir(out)}
        capsys.readouterr()
        assert main(_command(pipeline_dir, out, num_pairs=60, steps=8)[3:]) == 2
    finally:
        destroy_parallel()
    err = capsys.readouterr().err
    assert "holds a collection with other settings (sampler.steps: 40 there, 8 now); use a new directory" in err
    assert len(err.strip().splitlines()) == 1, err
    other_batch = _command(pipeline_dir, out, **longer)[3:]
    other_batch[other_batch.index("--batch-size") + 1] = "3"
    try:  # the batch size rounds x_0 apart (4e-6 here): a collection goes on with its own
        assert main(other_batch) == 2
    finally:
        destroy_parallel()
    assert "other settings (sampler.batch_size: 4 there, 3 now)" in capsys.readouterr().err


def test_a_finished_collection_with_a_lost_or_cut_shard_collects_those_again(reference, pipeline_dir, tmp_path,
                                                                           world_of_one, monkeypatch):
    """A rerun over a finished collection used to say it was done when a shard had gone missing or been
    cut (a partial copy) since, so training kept refusing it: those shards are collected again; a cut
    manifest is written again; with --verify, a shard whose SHA-256 differs from the manifest's too,
    and an intact collection verified loads no teacher."""
    import shutil

    from adm_megatron.cli import main

    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    os.truncate(out / shard_name(0), 1000)
    (out / shard_name(2)).unlink()
    kept = os.stat(out / shard_name(1)).st_mtime_ns
    assert main(_command(pipeline_dir, out)[3:]) == 0
    assert os.stat(out / shard_name(1)).st_mtime_ns == kept  # the whole shard was not redone
    assert _shards(out) == _shards(reference) and OdePairs(str(out)).verify() == []
    (out / MANIFEST).write_text('{"format": ')  # a cut manifest (a traceback before) is written again
    assert main(_command(pipeline_dir, out)[3:]) == 0
    assert (out / MANIFEST).read_bytes() == open(os.path.join(reference, MANIFEST), "rb").read()
    # a corrupted copy (bytes changed, the size kept): only --verify reads the shards whole
    with open(out / shard_name(1), "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\x7f" * 16)
    corrupted = _shards(out)
    assert main(_command(pipeline_dir, out)[3:]) == 0 and _shards(out) == corrupted
    assert main([*_command(pipeline_dir, out)[3:], "--verify"]) == 0
    assert _shards(out) == _shards(reference)
    assert (out / MANIFEST).read_bytes() == open(os.path.join(reference, MANIFEST), "rb").read()
    # --verify over an intact collection reads the shards and builds no teacher (minutes at 5b)
    from adm_megatron.train.teacher import TeacherSource

    built = []
    monkeypatch.setattr(TeacherSource, "build_models", lambda *a, **k: built.append(a) or pytest.fail("built"))
    assert main([*_command(pipeline_dir, out)[3:], "--verify"]) == 0 and built == []
    assert (out / MANIFEST).read_bytes() == open(os.path.join(reference, MANIFEST), "rb").read()


def test_a_repair_keeps_the_manifests_hash_of_a_shard_corrupted_since(reference, pipeline_dir, tmp_path,
                                                                     world_of_one):
    """A rerun that collected a cut shard again wrote the manifest from fresh SHA-256s of every shard
    on disk: one corrupted in place (its size kept) became good, and --verify no longer found it."""
    import shutil

    from adm_megatron.cli import main

    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    with open(out / shard_name(1), "r+b") as f:  # corrupted in place
        f.seek(-16, os.SEEK_END)
        f.write(b"\x7f" * 16)
    os.truncate(out / shard_name(2), 1000)  # cut
    corrupted = (out / shard_name(1)).read_bytes()
    kept = {i: os.stat(out / shard_name(i)).st_mtime_ns for i in (0, 1)}
    assert main(_command(pipeline_dir, out)[3:]) == 0
    assert {i: os.stat(out / shard_name(i)).st_mtime_ns for i in (0, 1)} == kept  # shard 2 alone collected
    assert (out / shard_name(1)).read_bytes() == corrupted
    assert (out / MANIFEST).read_bytes() == open(os.path.join(reference, MANIFEST), "rb").read()
    assert OdePairs(str(out)).verify() == [shard_name(1)]
    assert main([*_command(pipeline_dir, out)[3:], "--verify"]) == 0
    assert _shards(out) == _shards(reference)
    assert (out / MANIFEST).read_bytes() == open(os.path.join(reference, MANIFEST), "rb").read()


def test_a_shard_collected_again_by_a_killed_repair_gets_its_own_hash(reference, pipeline_dir, tmp_path,
                                                                     world_of_one, monkeypatch):
    """A repair of a finished collection killed after writing a shard again (the teacher on other
    hardware: other bytes): the next run kept the manifest's entry of the copy that shard replaced,
    so --verify called the new shard corrupted and collected it again. The shards a repair collects
    are recorded before it does (recollecting.json), and their entries are not kept."""
    import hashlib
    import shutil

    import adm_megatron.ode_collection as collection
    from adm_megatron.cli import main
    from adm_megatron.parallel.run_lock import LOCK_FILE

    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    (out / shard_name(1)).unlink()
    (out / shard_name(2)).unlink()
    write = collection.write_shard

    def other_bytes_then_killed(out_dir, index, tensors):
        write(out_dir, index, {**tensors, "x_0": tensors["x_0"] + 1e-3})
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(collection, "write_shard", other_bytes_then_killed)
    with pytest.raises(KeyboardInterrupt):
        main(_command(pipeline_dir, out)[3:])
    monkeypatch.setattr(collection, "write_shard", write)
    (out / LOCK_FILE).unlink(missing_ok=True)  # the killed process's lock (it held it in this one)
    assert json.loads((out / collection.RECOLLECTING).read_text()) == {"shards": [shard_name(1), shard_name(2)]}
    rewritten = (out / shard_name(1)).read_bytes()
    assert rewritten != _shards(reference)[shard_name(1)]
    assert main(_command(pipeline_dir, out)[3:]) == 0
    assert not (out / collection.RECOLLECTING).exists()
    entries = {e["file"]: e["sha256"] for e in json.loads((out / MANIFEST).read_text())["shards"]}
    assert entries[shard_name(1)] == hashlib.sha256(rewritten).hexdigest()
    assert OdePairs(str(out)).verify() == []
    assert main([*_command(pipeline_dir, out)[3:], "--verify"]) == 0 and (out / shard_name(1)).read_bytes() == rewritten


def test_a_second_collection_into_a_held_out_dir_is_refused_in_one_line(reference, pipeline_dir, tmp_path,
                                                                       world_of_one, capsys):
    """The same collection job submitted twice: the second one's rank 0 removed the first one's shards
    in the middle of their writing (as a killed run's leftovers) and both collected the rest."""
    from adm_megatron.cli import main
    from adm_megatron.parallel.run_lock import RunLock

    out = tmp_path / "pairs"
    held = RunLock(str(out), True, "--out", "collect-ode")  # as the first collection's rank 0 holds it
    assert main(_command(pipeline_dir, out)[3:]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"adm-megatron: config error: --out={str(out)!r} is in use by another collect-ode "
                              f"(host {socket.gethostname()}, pid {os.getpid()}, since "), message
    assert message.endswith("); wait for it to end, or use a new --out\n") and message.count("\n") == 1, message
    assert os.listdir(out) == [".run.lock"]
    held.release()
    assert main(_command(pipeline_dir, out)[3:]) == 0
    assert _shards(out) == _shards(reference)


def _collect_recording_hashes(pipeline_dir, out) -> list[str]:
    """A rank of a world collecting ``_command``'s pairs: the shard files it hashed for the manifest."""
    from adm_megatron import ode_collection
    from adm_megatron.cli import main

    hashed, real = [], ode_collection.sha256
    ode_collection.sha256 = lambda path: hashed.append(os.path.basename(path)) or real(path)
    assert main(_command(pipeline_dir, out)[3:]) == 0
    return hashed


@pytest.mark.slow  # two spawned ranks: about 30 s on 2 cores
def test_two_data_parallel_ranks_write_one_process_bytes_and_hash_their_own_shards(reference, pipeline_dir, tmp_path):
    """DP = 2 over 3 shards (not divisible): the shards and manifest one process writes; each rank
    hashes its own shards for the manifest (every rank used to hash all of them, reading the whole
    collection once per rank)."""
    from multiproc import run_world

    out = tmp_path / "pairs"
    hashed = run_world(_collect_recording_hashes, 2, pipeline_dir, str(out), timeout_s=300)
    assert hashed == [[shard_name(0), shard_name(2)], [shard_name(1)]]
    assert _shards(out) == _shards(reference)
    assert (out / MANIFEST).read_bytes() == open(os.path.join(reference, MANIFEST), "rb").read()


def test_bad_output_directories_fail_in_one_line(pipeline_dir, tmp_path):
    from adm_megatron.ode_collection import _check_out_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        _check_out_dir(str(tmp_path / "file"), {})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty and not an ODE-pair collection"):
        _check_out_dir(str(tmp_path / "busy"), {})
    manifest = tmp_path / "bad" / MANIFEST
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="format 'something else'"):
        OdePairs(str(manifest.parent))
    # cut JSON: a traceback from collect-ode, and training's message named no file
    manifest.write_text('{"format": ')
    with pytest.raises(ValueError, match=f"^{manifest}: not valid JSON \\(Expecting value: line 1"):
        OdePairs(str(manifest.parent))
    (tmp_path / "bad" / "collection.json").write_text('{"num_pairs": ')
    with pytest.raises(ConfigError, match=f"^--out '{tmp_path}/bad': {tmp_path}/bad/collection.json: not valid JSON "
                                          "\\(.*\\); use a new directory$"):
        _check_out_dir(str(tmp_path / "bad"), {})


def test_the_collection_runs_its_teacher_with_the_configs_kernel_options(pipeline_dir, tmp_path, world_of_one,
                                                                        monkeypatch):
    """As ``train`` does: the attention backend, FP8 and compile settings reach the teacher."""
    from adm_megatron.cli import main
    from adm_megatron.models import kernel_options

    applied = []
    real = kernel_options.apply_kernel_options

    def recording(network, model):
        real(network, model)
        applied.append((network, model))

    monkeypatch.setattr(kernel_options, "apply_kernel_options", recording)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{teacher: {pipeline_dir}, compile: blocks, attention_backend: math}}\n")
    assert main(["collect-ode", "--config", str(config), "--out", str(tmp_path / "pairs"), "--num-pairs", "2",
                 "--steps", "2", "--no-progress", *DATA]) == 0
    ((teacher, model),) = applied
    assert (model.compile, model.attention_backend) == ("blocks", "math")
    assert all(block._compiled_call_impl is not None for block in teacher.blocks)
    assert OdePairs(str(tmp_path / "pairs")).verify() == []


@pytest.mark.parametrize("example, refused_in_training", [
    ("cogvideox_2b_8step.yaml", "optim.generator.shard_over_dp=true: data parallel is 1"),
    ("dmdx_stage1_adp.yaml", "distill.head_every=3: the teacher has only 2 blocks"),  # and its data.real_path
])
def test_collect_ode_checks_only_the_keys_it_reads(example, refused_in_training, pipeline_dir, tmp_path, world_of_one):
    """The documented ``collect-ode --config <a training config>`` at DP = 1: the training-only keys
    (optimizer sharding over DP, discriminator heads, a stage config's data.real_path not collected
    yet, BF16 on CPU) stay training's checks and do not stop the collection."""
    from adm_megatron.cli import main
    from adm_megatron.train.teacher import resolve_teacher
    from adm_megatron.train.validate import validate_run

    config = os.path.join(ROOT, "examples", "cogvideox", example)
    run = [f"model.teacher={pipeline_dir}", "data.source=synthetic", "parallel.tensor_parallel=1", "data.frames=2",
           "data.height=4", "data.width=4"]
    with pytest.raises(ConfigError, match=f"^{refused_in_training}"):
        validate_run(load_config(config, [*run, "model.dtype=fp32"]), resolve_teacher(pipeline_dir), 1)
    assert main(["collect-ode", "--config", config, "--out", str(tmp_path / "pairs"), "--num-pairs", "1",
                 "--steps", "1", "--no-progress", *run]) == 0
    assert OdePairs(str(tmp_path / "pairs")).verify() == []
