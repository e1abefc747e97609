"""Text-embedding shards (write / read / validation / atomicity), the synthetic source, the prompt
sampler, and the precompute tool end to end against ``CogVideoXPipeline.encode_prompt``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from adm_megatron.data import (
    BatchLayout,
    EmbeddingShardWriter,
    PromptSampler,
    SyntheticTextEmbeddings,
    TextEmbeddingShards,
    build_tiny_pipeline,
    load_t5,
    write_embedding_shards,
)
from adm_megatron.data import text_embeddings
from tool_scripts import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, D = 5, 6


def _data(n: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [f"prompt {i}" for i in range(n)]
    return prompts, torch.randn(n, L, D, generator=g).to(dtype), torch.randn(L, D, generator=g).to(dtype)


@pytest.fixture
def shards(tmp_path):
    prompts, emb, neg = _data(7)
    path = write_embedding_shards(str(tmp_path / "emb"), prompts, emb, neg, shard_size=3, encoder="enc")
    return path, prompts, emb, neg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_bit_exact(tmp_path, dtype):
    prompts, emb, neg = _data(7, dtype)
    out = str(tmp_path / "emb")
    assert write_embedding_shards(out, prompts, emb, neg, shard_size=3, encoder="t5-tiny") == out
    index = json.load(open(os.path.join(out, "index.json")))
    assert [s["rows"] for s in index["shards"]] == [3, 3, 1]
    shard_files = [f"shard-0000{i}.safetensors" for i in range(3)]
    assert sorted(os.listdir(out)) == ["index.json", "negative.safetensors", *shard_files]
    assert (index["num_prompts"], index["seq_len"], index["dim"], index["encoder"]) == (7, L, D, "t5-tiny")
    src = TextEmbeddingShards(out)
    assert (len(src), src.seq_len, src.dim, src.dtype, src.prompts) == (7, L, D, dtype, prompts)
    idx = torch.tensor([6, 0, 3, 3, 2, 5])
    got = src.get(idx)
    assert got.dtype == dtype and torch.equal(got, emb[idx])
    assert torch.equal(src.get(torch.arange(7)), emb)
    assert torch.equal(src.negative(), neg)
    assert src.get(torch.tensor([], dtype=torch.long)).shape == (0, L, D)


def test_streaming_writer_chunks(tmp_path):
    prompts, emb, neg = _data(9)
    with EmbeddingShardWriter(str(tmp_path / "emb"), neg, shard_size=4) as writer:
        for a, b in ((0, 2), (2, 3), (3, 8), (8, 9)):
            writer.add(prompts[a:b], emb[a:b])
        writer.close()
    src = TextEmbeddingShards(str(tmp_path / "emb"))
    assert torch.equal(src.get(torch.arange(9)), emb) and src.prompts == prompts
    assert [s["rows"] for s in json.load(open(tmp_path / "emb" / "index.json"))["shards"]] == [4, 4, 1]


def test_write_argument_errors(tmp_path):
    prompts, emb, neg = _data(3)
    with pytest.raises(ValueError, match=r"embeddings shape \(3, 5, 6\) != .* \(2, 5, 6\)"):
        write_embedding_shards(str(tmp_path / "a"), prompts[:2], emb, neg)
    with pytest.raises(ValueError, match="dtype"):
        write_embedding_shards(str(tmp_path / "a"), prompts, emb.half(), neg)
    with pytest.raises(ValueError, match="unsupported embedding dtype"):
        write_embedding_shards(str(tmp_path / "a"), prompts, emb.double(), neg.double())
    with pytest.raises(ValueError, match="no prompts"):
        write_embedding_shards(str(tmp_path / "a"), [], emb[:0], neg)
    assert sorted(os.listdir(tmp_path)) == []  # failed writes leave nothing behind


def test_refuses_non_empty_dir_unless_overwrite(shards):
    path, prompts, emb, neg = shards
    with pytest.raises(FileExistsError, match="not empty"):
        write_embedding_shards(path, prompts[:2], emb[:2], neg)
    write_embedding_shards(path, prompts[:2], emb[:2] + 1, neg, overwrite=True)
    src = TextEmbeddingShards(path)
    assert len(src) == 2 and torch.equal(src.get(torch.arange(2)), emb[:2] + 1)
    assert sorted(os.listdir(os.path.dirname(path))) == ["emb"]


def test_atomic_write_after_injected_failure(tmp_path, monkeypatch, shards):
    path, prompts, emb, neg = shards
    real_save, calls = text_embeddings.save_file, []

    def failing_save(tensors, file, *args, **kwargs):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real_save(tensors, file, *args, **kwargs)

    monkeypatch.setattr(text_embeddings, "save_file", failing_save)
    with pytest.raises(OSError, match="injected"):
        write_embedding_shards(str(tmp_path / "new"), prompts, emb, neg, shard_size=2)
    calls.clear()
    with pytest.raises(OSError, match="injected"):  # a failed overwrite keeps the old directory
        write_embedding_shards(path, prompts[:4], emb[:4] * 0, neg, shard_size=2, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["emb"]
    assert torch.equal(TextEmbeddingShards(path).get(torch.arange(7)), emb)


def test_a_killed_writers_temporary_directory_is_removed_by_the_next_writer(tmp_path, shards, caplog):
    """A precompute killed with SIGKILL (OOM, a preempted job) left its hidden temporary directory --
    up to a whole prompt set's embeddings -- beside --out for good; the next writer of that --out on
    the host removes those of dead processes and names, but keeps, the others."""
    import socket

    path, prompts, emb, neg = shards
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = tmp_path / f".emb.tmp-{host}-{int(gone.stdout)}-abc123"
    old = tmp_path / f".emb.tmp-{host}-{int(gone.stdout)}-abc124-old"  # killed while replacing out_dir
    alive, other = tmp_path / f".emb.tmp-{host}-{os.getpid()}-abc125", tmp_path / ".emb.tmp-xyz"
    for leftover in (dead, old, alive, other):
        leftover.mkdir()
        (leftover / "shard-00000.safetensors").write_bytes(b"x" * 100)
    write_embedding_shards(path, prompts[:2], emb[:2], neg, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, "emb"])
    assert f"removed 2 temporary directories of writers killed before they finished ({dead}, {old})" in caplog.text
    assert f"{alive}, {other}: temporary directories of another writer of it" in caplog.text


def _edit_index(path, edit):
    file = os.path.join(path, "index.json")
    index = json.load(open(file))
    edit(index)
    json.dump(index, open(file, "w"))


@pytest.mark.parametrize("corrupt, error, pattern", [
    (lambda p: os.remove(os.path.join(p, "index.json")), FileNotFoundError, r"index\.json: index file not found"),
    (lambda p: open(os.path.join(p, "index.json"), "w").write("{"), ValueError, r"index\.json: invalid JSON"),
    (lambda p: _edit_index(p, lambda i: i.pop("dim")), ValueError, r"index\.json: key 'dim' is missing"),
    (lambda p: _edit_index(p, lambda i: i.update(seq_len="5")), ValueError, r"index\.json: key 'seq_len' must be int"),
    (lambda p: _edit_index(p, lambda i: i.update(format="x")), ValueError, r"index\.json: key 'format' is 'x'"),
    (lambda p: _edit_index(p, lambda i: i.update(version=9)), ValueError, r"index\.json: key 'version' is 9"),
    (lambda p: _edit_index(p, lambda i: i.update(dtype="int8")), ValueError, r"index\.json: key 'dtype' is 'int8'"),
    (lambda p: _edit_index(p, lambda i: i["prompts"].pop()), ValueError, r"index\.json: key 'prompts' has 6 entries"),
    (lambda p: _edit_index(p, lambda i: i["shards"][1].pop("rows")), ValueError,
     r"index\.json: key 'shards\[1\]' must be"),
    (lambda p: _edit_index(p, lambda i: i["shards"].pop()), ValueError, r"index\.json: key 'shards' hold 6 rows"),
    (lambda p: os.remove(os.path.join(p, "shard-00001.safetensors")), FileNotFoundError,
     r"index\.json: key 'shards\[1\]\.file' names .*shard-00001\.safetensors, which does not exist"),
    (lambda p: os.remove(os.path.join(p, "negative.safetensors")), FileNotFoundError,
     r"index\.json: key 'negative' names .*negative\.safetensors"),
    (lambda p: _edit_index(p, lambda i: i.update(seq_len=4)), ValueError,
     r"shard-00000\.safetensors: tensor 'embeddings' has shape \[3, 5, 6\], "
     r"index\.json \(shards\[0\]\.file\) says \[3, 4, 6\]"),
    (lambda p: _edit_index(p, lambda i: i.update(dtype="bfloat16")), ValueError,
     r"shard-00000\.safetensors: tensor 'embeddings' has dtype F32, index\.json says bfloat16"),
    (lambda p: save_file({"other": torch.zeros(1)}, os.path.join(p, "shard-00002.safetensors")), ValueError,
     r"shard-00002\.safetensors: tensor 'embeddings' not found"),
    (lambda p: open(os.path.join(p, "negative.safetensors"), "wb").write(b"xx"), ValueError,
     r"negative\.safetensors: unreadable safetensors file"),
])
def test_index_validation_errors(shards, corrupt, error, pattern):
    path = shards[0]
    corrupt(path)
    with pytest.raises(error, match=pattern) as info:
        TextEmbeddingShards(path)
    assert "\n" not in str(info.value)


def test_get_rejects_bad_indices(shards):
    src = TextEmbeddingShards(shards[0])
    with pytest.raises(IndexError, match=r"out of range \[0, 7\)"):
        src.get(torch.tensor([7]))
    with pytest.raises(ValueError, match="1-D LongTensor"):
        src.get(torch.tensor([[1]]))


def test_synthetic_source_is_deterministic():
    a, b = SyntheticTextEmbeddings(10, 8, 16, seed=3), SyntheticTextEmbeddings(10, 8, 16, seed=3)
    assert (len(a), a.seq_len, a.dim, a.prompts[3]) == (10, 8, 16, "synthetic prompt 3")
    rows = a.get(torch.arange(10))
    assert rows.shape == (10, 8, 16) and torch.equal(rows, b.get(torch.arange(10)))
    assert torch.equal(a.get(torch.tensor([4, 1]))[1], rows[1])  # a row does not depend on the batch
    assert torch.equal(a.negative(), b.negative()) and a.negative().shape == (8, 16)
    assert not torch.equal(a.negative(), rows[0]) and not torch.equal(rows[0], rows[1])
    assert not torch.equal(SyntheticTextEmbeddings(10, 8, 16, seed=4).get(torch.arange(10)), rows)
    assert abs(rows.std().item() - 1) < 0.1 and abs(rows.mean().item()) < 0.1
    assert SyntheticTextEmbeddings(2, 3, 4, dtype=torch.bfloat16).get(torch.tensor([0])).dtype == torch.bfloat16


def test_prompt_sampler_determinism_and_disjoint_ranks():
    src = SyntheticTextEmbeddings(64, 4, 8)
    ranks = [PromptSampler(src, BatchLayout(4, r, 4), seed=7) for r in range(4)]
    epoch = []
    for it in range(4):  # one epoch: 4 iterations x 4 ranks x 4 prompts = 64
        draws = [s.indices(it) for s in ranks]
        assert all(d.dtype == torch.long and d.shape == (4,) for d in draws)
        assert len(set(torch.cat(draws).tolist())) == 16  # ranks draw different prompts
        epoch += torch.cat(draws).tolist()
    assert sorted(epoch) == list(range(64))  # every prompt once per epoch
    fresh = PromptSampler(src, BatchLayout(4, 2, 4), seed=7)  # a resumed run
    for it in (9, 3, 0, 9):
        assert torch.equal(fresh.indices(it), ranks[2].indices(it))
    assert not torch.equal(PromptSampler(src, BatchLayout(4, 2, 4), seed=8).indices(0), ranks[2].indices(0))
    assert ranks[0].indices(4).tolist() != ranks[0].indices(0).tolist()  # a new epoch, a new order
    one_rank = PromptSampler(src, BatchLayout(16), seed=7)  # the global batch does not depend on the DP layout
    assert all(torch.equal(one_rank.indices(it), torch.cat([s.indices(it) for s in ranks])) for it in (0, 6))
    embeds, negative = ranks[1].batch(5)
    assert torch.equal(embeds, src.get(ranks[1].indices(5)))
    assert negative.shape == (4, 4, 8) and all(torch.equal(n, src.negative()) for n in negative)


def test_prompt_sampler_micro_batches_cut_the_same_global_batch():
    """Gradient accumulation: DP x micro-batches x rows is one global batch, whatever the split, and
    the (rank, micro-batch) slots of an iteration are disjoint."""
    src = SyntheticTextEmbeddings(64, 4, 8)
    whole = PromptSampler(src, BatchLayout(8), seed=3)
    for dp, micro_batch, microbatches in ((2, 1, 4), (1, 2, 4), (4, 2, 1), (2, 2, 2)):
        samplers = [PromptSampler(src, BatchLayout(micro_batch, r, dp, microbatches), seed=3) for r in range(dp)]
        for it in (0, 5, 8):  # 8 global batches of 8 is one epoch: 8 starts the next
            slots = [s.indices(it, m) for m in range(microbatches) for s in samplers]  # slot order m x DP + r
            assert torch.equal(torch.cat(slots), whole.indices(it))
            assert len(set(torch.cat(slots).tolist())) == 8
    with pytest.raises(ValueError, match="micro-batch 2 outside"):
        PromptSampler(src, BatchLayout(1, 0, 1, 2), seed=3).indices(0, 2)


def test_prompt_sampler_argument_errors():
    src = SyntheticTextEmbeddings(4, 2, 2)
    with pytest.raises(ValueError, match="dp_rank must be in"):
        BatchLayout(2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="micro_batch"):
        BatchLayout(0)
    with pytest.raises(ValueError, match="iteration"):
        PromptSampler(src, BatchLayout(2), 0).indices(-1)
    assert PromptSampler(src, BatchLayout(10), 0).indices(3).shape == (10,)  # more than the prompts: wraps epochs


# -- the precompute tool -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"), seed=1)


def test_precompute_tool_matches_pipeline_encode_prompt(tiny_pipeline, tmp_path):
    from diffusers import CogVideoXPipeline

    prompts = ["a cat walking in the city at night", "red car", "ZEBRA on a blue sea!",
               "a very long prompt that the tokenizer will certainly truncate at sixteen tokens"]
    (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", "  ", *prompts[1:], ""]) + "\n")
    out = tmp_path / "emb"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "precompute_text_embeddings.py"),
           "--prompts", str(tmp_path / "prompts.txt"), "--encoder", tiny_pipeline, "--out", str(out),
           "--max-length", "16", "--batch-size", "8", "--shard-size", "3", "--dtype", "float32", "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    src = TextEmbeddingShards(str(out))
    assert src.prompts == prompts and (src.seq_len, src.dim, src.encoder) == (16, 32, tiny_pipeline)
    assert ("warning: 1 of 4 prompts are longer than 16 T5 tokens and were cut to them (raise --max-length to keep "
            "them whole)") in result.stderr

    pipe = CogVideoXPipeline.from_pretrained(tiny_pipeline)
    # The tool encodes shard by shard (3 + 1 prompts) and "" alone; batch composition and grad
    # mode (SDPA's CPU kernel) change the last bits, so encode the same batches under no_grad, as
    # the pipeline's __call__ does, for a bitwise match.
    with torch.no_grad():
        first, _ = pipe.encode_prompt(prompts[:3], do_classifier_free_guidance=False, max_sequence_length=16)
        last, negative = pipe.encode_prompt(prompts[3:], do_classifier_free_guidance=True, max_sequence_length=16)
    assert torch.equal(src.get(torch.arange(4)), torch.cat([first, last]))
    assert torch.equal(src.negative(), negative[0])


def test_encoder_folder_layouts(tiny_pipeline, tmp_path):
    text_encoder, tokenizer = load_t5(tiny_pipeline)
    text_encoder.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    combined, _ = load_t5(str(tmp_path / "t5"))
    assert all(torch.equal(a, b) for a, b in zip(combined.state_dict().values(), text_encoder.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="neither a pipeline root"):
        load_t5(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="encoder directory not found"):
        load_t5(str(tmp_path / "missing"))


def test_precompute_tool_rejects_empty_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match=r"empty\.txt: no prompts"):
        load_tool("precompute_text_embeddings").read_prompts(str(tmp_path / "empty.txt"))
    # as a command: one line naming the tool, exit status 2 as adm-megatron's for bad input (was 1)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "precompute_text_embeddings.py"), "--prompts",
                          str(tmp_path / "empty.txt"), "--encoder", str(tmp_path), "--out", str(tmp_path / "emb")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        f"precompute_text_embeddings.py: {tmp_path / 'empty.txt'}: no prompts (the file is empty or blank; expected "
        "one per line)"), run.stderr[-1000:]


def test_precompute_takes_the_length_a_cogvideox_pipelines_transformer_takes(tmp_path):
    """Without --max-length the tiny pipeline's prompts were encoded at the published 226 tokens, which
    its transformer (16) refuses to train on."""
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    tool = load_tool("precompute_text_embeddings")
    pipeline = build_tiny_pipeline(str(tmp_path / "pipe"), seed=0)
    with open(os.path.join(pipeline, "transformer", "config.json")) as f:
        length = json.load(f)["max_text_seq_length"]
    assert length != 226 and tool.max_lengths(pipeline)[:2] == (length, length)  # the default and the most
    assert tool.max_lengths(str(tmp_path))[:2] == (226, 512)  # no transformer config: the published length, T5's


def test_prompt_file_reads_a_byte_order_mark_and_crlf_and_names_a_non_utf8_file(tmp_path):
    from adm_megatron.data.prompt_file import read_prompt_file

    path = tmp_path / "p.txt"
    # Notepad's UTF-8: a byte-order mark (was kept as the first prompt's first character) and CRLF
    path.write_bytes("\ufeffa red cat\r\n\r\n  café 日本 \r\n# kept\rblue sky\r\n".encode("utf-8"))
    assert read_prompt_file(str(path)) == ["a red cat", "café 日本", "# kept", "blue sky"]
    path.write_bytes(b"\xef\xbb\xbfa cat\nb dog\ncaf\xe9\n")  # Latin-1 after a BOM: was a message naming no file
    with pytest.raises(ValueError, match=r"^\S*p\.txt: not UTF-8 text \(byte 0xe9 on line 3: .*\); save it as UTF-8$"):
        read_prompt_file(str(path))
    with pytest.raises(ValueError, match=r"^\S*: a directory, not a prompt file$"):  # was "not found"
        read_prompt_file(str(tmp_path))


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size=0: expected >= 1"),  # was a traceback after loading the encoder
    (["--max-length", "0"], "--max-length=0: expected >= 1"),  # 0 used to mean the default length
    (["--device", "gpu"], "--device=gpu: not a torch device (cpu, cuda, cuda:N)"),  # torch's RuntimeError, later
    (["--device", "cuda:64"], "--device=cuda:64: this machine has "),  # AssertionError without CUDA
    (["--out-is-full"], "not empty (earlier embeddings; pass --overwrite to replace them)"),
])
def test_precompute_tool_refuses_bad_arguments_before_loading_the_encoder(extra, message, tmp_path, monkeypatch):
    tool = load_tool("precompute_text_embeddings")
    loaded = []
    monkeypatch.setattr(tool, "load_encoder", lambda *a: loaded.append(a))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    out = tmp_path / "emb"
    if extra == ["--out-is-full"]:
        out.mkdir()
        (out / "index.json").write_text("{}")
        extra = []
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--prompts", str(tmp_path / "prompts.txt"), "--encoder", str(tmp_path), "--out", str(out), *extra])
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
    assert loaded == []


def test_precompute_tool_names_a_directory_without_an_encoder_in_one_line(tmp_path):
    tool = load_tool("precompute_text_embeddings")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    with pytest.raises(SystemExit, match=r"^--encoder: .*neither a pipeline root"):
        tool.main(["--prompts", str(tmp_path / "prompts.txt"), "--encoder", str(tmp_path), "--out", str(tmp_path / "e")])
    assert sorted(os.listdir(tmp_path)) == ["prompts.txt"]  # its work directory (a .run.lock) was left behind


@pytest.mark.parametrize("encoder, length, most, why", [
    ("cogvideox", 17, 16, "the longest prompt (max_sequence_length) the --encoder pipeline renders with"),
    ("cogvideox", 100000, 16, "the longest prompt (max_sequence_length) the --encoder pipeline renders with"),
    ("sd3", 513, 512, "the longest prompt (max_sequence_length) the --encoder pipeline renders with"),
    ("t5", 100000, 512, "the input length T5 was pre-trained at"),
])
def test_precompute_tool_refuses_a_longer_max_length_than_the_pipeline_renders_with(
        encoder, length, most, why, tiny_pipeline, sd3_pipeline, tmp_path, monkeypatch):
    """SD3 took --max-length 600, whose embeddings StableDiffusion3Pipeline refuses to sample with (it
    takes max_sequence_length <= 512); 100000 ran T5 out of memory after loading it (a traceback)."""
    tool = load_tool("precompute_text_embeddings")
    directory = {"cogvideox": tiny_pipeline, "sd3": sd3_pipeline, "t5": str(tmp_path / "t5")}[encoder]
    if encoder == "t5":  # a bare T5 folder: no transformer to say what it takes
        text_encoder, tokenizer = load_t5(tiny_pipeline)
        text_encoder.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    class Loaded(Exception):
        pass

    def load(*_):
        raise Loaded

    monkeypatch.setattr(tool, "load_encoder", load)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    args = ["--prompts", str(tmp_path / "prompts.txt"), "--encoder", directory, "--out", str(tmp_path / "e")]
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*args, "--max-length", str(length)])
    assert str(exit_info.value.code) == f"--max-length={length}: expected at most {most}, {why}"
    with pytest.raises(Loaded):  # the most is taken
        tool.main([*args, "--max-length", str(most)])
    assert not (tmp_path / ".e.partial").exists() and not (tmp_path / "e").exists()


def test_precompute_tool_names_an_encoder_folder_without_weights_in_one_line(tiny_pipeline, tmp_path):
    """It was transformers' OSError with a traceback."""
    import shutil

    tool = load_tool("precompute_text_embeddings")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_pipeline, pipe, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(SystemExit, match=rf"^--encoder: .*no file named model\.safetensors.* {pipe}/text_encoder\.$"):
        tool.main(["--prompts", str(tmp_path / "prompts.txt"), "--encoder", str(pipe), "--out", str(tmp_path / "e")])
    assert sorted(os.listdir(tmp_path)) == ["pipe", "prompts.txt"]  # its work directory was left behind


def test_a_precompute_that_fails_before_its_first_shard_leaves_no_work_directory(tiny_pipeline, tmp_path,
                                                                                 monkeypatch):
    """It left .NAME.partial/ with its .run.lock (and progress.json), which named nothing to resume and
    refused the next precompute of --out with other settings."""
    tool = load_tool("precompute_text_embeddings")
    (tmp_path / "prompts.txt").write_text("a cat\nblue sky\n")
    encode, calls = tool.encode_prompts, []

    def failing(encoder, tokenizer, batch, *rest):
        calls.append(batch)
        if len(calls) == fail_at:
            raise MemoryError("out of memory")
        return encode(encoder, tokenizer, batch, *rest)

    monkeypatch.setattr(tool, "encode_prompts", failing)
    args = ["--prompts", str(tmp_path / "prompts.txt"), "--encoder", tiny_pipeline, "--out", str(tmp_path / "e"),
            "--shard-size", "1", "--dtype", "float32", "--device", "cpu"]
    for fail_at in (1, 2):  # the negative prompt, the first shard's
        calls.clear()
        with pytest.raises(MemoryError):
            tool.main(args)
        assert sorted(os.listdir(tmp_path)) == ["prompts.txt"]
    calls.clear()
    fail_at = 3  # after a shard: kept, for the same command to resume
    with pytest.raises(MemoryError):
        tool.main(args)
    assert sorted(os.listdir(tmp_path / ".e.partial")) == [".run.lock", "progress.json", "shard-00000.safetensors"]


def test_a_killed_precompute_resumes_and_writes_the_uninterrupted_bytes(tiny_pipeline, tmp_path, monkeypatch, capsys):
    """A precompute killed part-way (a preempted job) started from its first prompt again; now the same
    command encodes only the prompts after the last shard written, and its output is the uninterrupted
    run's byte for byte. Another precompute of that --out at the same time, or the unfinished one's
    settings changed (another --max-length), are refused in one line before the encoder loads."""
    from adm_megatron.data.resumable_shards import lock_work_dir

    tool = load_tool("precompute_text_embeddings")
    prompts = [f"prompt number {i} of seven" for i in range(7)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = ["--prompts", str(tmp_path / "prompts.txt"), "--encoder", tiny_pipeline, "--max-length", "16",
            "--shard-size", "2", "--batch-size", "2", "--dtype", "float32", "--device", "cpu"]
    tool.main([*args, "--out", str(tmp_path / "whole")])
    encode, calls = tool.encode_prompts, []

    def recorded(encoder, tokenizer, batch, *rest):
        calls.append(list(batch))
        if len(calls) == 4 and dying:  # the negative, two shards, then the third chunk
            raise KeyboardInterrupt
        return encode(encoder, tokenizer, batch, *rest)

    monkeypatch.setattr(tool, "encode_prompts", recorded)
    out, work = tmp_path / "emb", tmp_path / ".emb.partial"
    dying = True
    with pytest.raises(KeyboardInterrupt):
        tool.main([*args, "--out", str(out)])
    assert not out.exists() and sorted(os.listdir(work)) == [".run.lock", "progress.json", "shard-00000.safetensors",
                                                           "shard-00001.safetensors"]
    with pytest.raises(SystemExit) as refused:  # an unfinished precompute with other settings
        tool.main([*args[:-8], "--max-length", "8", *args[-6:], "--out", str(out)])
    assert str(refused.value) == (f"--out {out}: an unfinished precompute in {work} has max_length=16, this one 8: run "
                                  "it again as it was to finish it, or remove that directory to start anew")
    lock = lock_work_dir(str(out))  # a precompute of the same --out running meanwhile
    with pytest.raises(SystemExit, match=rf"^--out='{out}' is in use by another precompute \(host .*, pid {os.getpid()}"):
        tool.main([*args, "--out", str(out)])
    lock.release()
    assert len(calls) == 4  # neither refusal encoded anything
    calls.clear()
    dying = False
    capsys.readouterr()
    tool.main([*args, "--out", str(out)])
    assert calls == [[""], prompts[4:6], prompts[6:]]  # the negative, then only what was left
    assert f"resuming: 4 of 7 prompts already encoded (in {work})" in capsys.readouterr().out
    assert not work.exists() and sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
