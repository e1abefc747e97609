"""Encode a prompt file with a local text encoder into text-embedding shards for training.

    python tools/precompute_text_embeddings.py --prompts prompts.txt \
        --encoder /models/CogVideoX-2b --out data/prompts-2b [--max-length 226] [--dtype bfloat16]
    python tools/precompute_text_embeddings.py --prompts prompts.txt \
        --encoder /models/stable-diffusion-3.5-large --out data/prompts-sd35 [--max-length 256]

``--prompts``: one prompt per line, blank lines skipped. ``--encoder``: a CogVideoX pipeline root
(``text_encoder/`` + ``tokenizer/``) or one folder holding a T5 encoder and its tokenizer -- encoded
as ``CogVideoXPipeline.encode_prompt`` does --, or a ``StableDiffusion3Pipeline`` root, encoded by
that pipeline's own ``encode_prompt`` (two CLIP encoders and T5; the shards also hold the pooled
CLIP embedding). The negative (unconditional) embedding is that of "". Shards are written one at a
time, so memory stays at one shard. A precompute killed part-way (a preempted job) resumes when the
same command is run again: it encodes only the prompts after the last shard written
(``adm_megatron/data/resumable_shards.py``), into the same bytes as an uninterrupted run; one refused
or failed before its first shard leaves no work directory behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from adm_megatron.config import ConfigError  # noqa: E402
from adm_megatron.data import encode_prompts, load_t5  # noqa: E402
from adm_megatron.data.encode import count_cut, text_encoder_fingerprint  # noqa: E402
from adm_megatron.data.encode_sd3 import encode_sd3_prompts, is_sd3_pipeline, load_sd3_text_pipeline  # noqa: E402
from adm_megatron.data.prompt_file import read_prompt_file  # noqa: E402
from adm_megatron.data.resumable_shards import (  # noqa: E402
    ResumableShardWriter, check_resumable, lock_work_dir, work_dir_of)
from adm_megatron.data.text_embeddings import DTYPES  # noqa: E402
from adm_megatron.families.registry import T5_MAX_LENGTH  # noqa: E402
from adm_megatron.hub_cache import local_dir  # noqa: E402
from adm_megatron.mcore_compat import quiet_import_notices  # noqa: E402


class Refused(SystemExit):
    """A mistake in the command's input: one line on stderr, exit status 2 (as adm-megatron's)."""


def read_prompts(path: str) -> list[str]:
    try:
        return read_prompt_file(path)
    except ValueError as err:
        raise Refused(str(err)) from None


def check_args(args: argparse.Namespace) -> None:
    """One-line refusals before any encoder is loaded (a T5-XXL takes minutes)."""
    for flag, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size),
                        ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise Refused(f"{flag}={value}: expected >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise Refused(f"--device={args.device}: not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise Refused(f"--device={args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
                         + ("" if torch.cuda.is_available() else " (no CUDA here: use --device cpu)"))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise Refused(f"--out {args.out}: exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise Refused(f"--out {args.out}: not empty (earlier embeddings; pass --overwrite to replace them)")


def _conditioning(encoder: str):
    """The text conditioning of the pipeline's transformer (its family's), or None: a bare T5 folder,
    or a transformer no family reads."""
    from adm_megatron.families import family_of_model_dir

    transformer = os.path.join(encoder, "transformer")
    if not os.path.isfile(os.path.join(transformer, "config.json")):
        return None
    try:
        family = family_of_model_dir(transformer)
        return family.conditioning(family.arch_from_pretrained_dir(transformer))
    except ValueError:
        return None


def max_lengths(encoder: str) -> tuple[int, int, str]:
    """T5 tokens per prompt: (the default when ``--max-length`` is not given, the most, why that most).
    The default: what the pipeline's transformer takes (its family's conditioning: CogVideoX's
    ``max_text_seq_length``, 226 in the published ones, 16 in the tiny test pipeline); for a family
    that takes any length (SD3) or a bare T5 folder, the usual T5 length (SD3's 256, CogVideoX's 226).
    The most: the longest prompt the pipeline renders with (the family's ``max_sequence_length``:
    CogVideoX's ``max_text_seq_length``, SD3's 512), else T5's own (``T5_MAX_LENGTH``, 512)."""
    text = _conditioning(encoder)
    default = text.text_length if text is not None and not text.any_text_length else \
        256 if is_sd3_pipeline(encoder) else 226
    if text is None:
        return default, T5_MAX_LENGTH, "the input length T5 was pre-trained at"
    return default, text.max_sequence_length, "the longest prompt (max_sequence_length) the --encoder pipeline " \
        "renders with"


def settings(args: argparse.Namespace, prompts: list[str]) -> dict:
    """Everything that decides the output's bytes: what a resumed precompute must have in common
    with the one it finishes."""
    return {"prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "num_prompts": len(prompts),
            "encoder": os.path.abspath(args.encoder), "encoder_fingerprint": text_encoder_fingerprint(args.encoder),
            "max_length": args.max_length, "dtype": args.dtype, "batch_size": args.batch_size,
            "shard_size": args.shard_size, "device_type": torch.device(args.device).type}


def load_encoder(args: argparse.Namespace, dtype: torch.dtype):
    """The SD3 text pipeline or the T5 (encoder, tokenizer) that ``--encoder`` holds; a directory
    without one, or without its weights, is refused in one line."""
    try:
        if is_sd3_pipeline(args.encoder):
            return load_sd3_text_pipeline(args.encoder, dtype, args.device)
        return load_t5(args.encoder, dtype, args.device)
    except OSError as err:  # a folder missing, or transformers' own for weights missing from one
        raise Refused(f"--encoder: {' '.join(str(err).split())}") from None


def main(argv: list[str] | None = None) -> None:
    quiet_import_notices()  # torchao's and torch's import-time notices (adm_megatron/mcore_compat.py)
    # and megatron-core's, imported to read the pipeline transformer's architecture (max_lengths)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--encoder", required=True,
                        help="CogVideoX / SD3 pipeline root, or a T5 encoder + tokenizer folder (or a Hugging Face "
                        "repo id in the local hub cache)")
    parser.add_argument("--out", required=True,
                        help="output shard directory (written whole at the end; a killed precompute resumes when "
                             "the same command is run again)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="T5 tokens per prompt (default: for a CogVideoX pipeline what its transformer takes, "
                             "max_text_seq_length: 226 in the published ones; SD3 256); at most what the pipeline "
                             "renders with (CogVideoX: that length, SD3: 512), for a bare T5 512")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts encoded at once (default 8)")
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard file (default 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="encoder compute and storage dtype (default bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)

    args.encoder = local_dir(args.encoder, "--encoder")  # a repo id: its snapshot in the local hub cache
    check_args(args)
    default, most, why = max_lengths(args.encoder)
    if args.max_length is None:
        args.max_length = default
    elif args.max_length > most:  # (a huge one ran T5 out of memory)
        raise Refused(f"--max-length={args.max_length}: expected at most {most}, {why}")
    prompts = read_prompts(args.prompts)
    wanted = settings(args, prompts)
    try:  # before the encoder loads: another precompute of --out running, or one of other settings to finish
        lock = lock_work_dir(args.out)
    except ConfigError as err:
        raise Refused(str(err)) from None
    try:
        try:
            check_resumable(args.out, wanted)
        except ValueError as err:
            raise Refused(str(err)) from None
        try:
            encode_all(args, prompts, wanted, lock)
        except BaseException:  # refused, failed or stopped: without a shard written there is nothing to resume
            try:
                written = check_resumable(args.out, wanted)
            except ValueError:  # its record unreadable: kept for a look, the original error raised
                written = True
            if not written:
                shutil.rmtree(work_dir_of(args.out), ignore_errors=True)
            raise
    finally:
        lock.release()  # (also when the encoder cannot load; the writer releases it once it has it)


def encode_all(args: argparse.Namespace, prompts: list[str], wanted: dict, lock) -> None:
    """Load the encoder and write the shards (after those an earlier start wrote) into place."""
    start = time.time()
    dtype = DTYPES[args.dtype][0]
    encoder = load_encoder(args, dtype)
    if is_sd3_pipeline(args.encoder):
        t5_tokens, t5_tokenizer = args.max_length, encoder.tokenizer_3

        def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return encode_sd3_prompts(encoder, batch, t5_tokens, args.batch_size)
    else:
        text_encoder, tokenizer = encoder
        t5_tokens, t5_tokenizer = args.max_length, tokenizer

        def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return encode_prompts(text_encoder, tokenizer, batch, args.max_length, args.batch_size), None

    negative, negative_pooled = encode([""])
    negative_pooled = None if negative_pooled is None else negative_pooled[0]
    with ResumableShardWriter(args.out, negative[0], wanted, lock, args.shard_size, args.encoder, args.overwrite,
                              negative_pooled) as writer:
        if writer.done:
            print(f"resuming: {writer.done} of {len(prompts)} prompts already encoded (in {work_dir_of(args.out)})",
                  flush=True)
            writer.skip(prompts[: writer.done])
        for i in range(writer.done, len(prompts), args.shard_size):
            chunk = prompts[i : i + args.shard_size]
            writer.add(chunk, *encode(chunk))
            print(f"encoded {i + len(chunk)}/{len(prompts)} prompts", flush=True)
        writer.close()
    cuts = [("T5", t5_tokenizer, t5_tokens, "raise --max-length to keep them whole")]
    if is_sd3_pipeline(args.encoder):  # its two CLIP encoders take a fixed length (77), whatever --max-length
        cuts.append(("CLIP", encoder.tokenizer, encoder.tokenizer_max_length,
                     "the pipeline's CLIP length is fixed; its T5 part holds up to --max-length"))
    for name, tokenizer, length, remedy in cuts:
        cut = count_cut(tokenizer, prompts, length)
        if cut:  # as the pipelines do, silently but for their log's warning
            print(f"precompute_text_embeddings.py: warning: {cut} of {len(prompts)} prompts are longer than {length} "
                  f"{name} tokens and were cut to them ({remedy})", file=sys.stderr)
    pooled = "" if negative_pooled is None else f" (+ pooled {tuple(negative_pooled.shape)})"
    print(f"wrote {len(prompts)} x {tuple(negative[0].shape)}{pooled} {args.dtype} embeddings to {args.out} "
          f"in {time.time() - start:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except Refused as refusal:
        print(f"precompute_text_embeddings.py: {refusal}", file=sys.stderr)
        sys.exit(2)
