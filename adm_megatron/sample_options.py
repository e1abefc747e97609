"""The checks of ``adm-megatron sample``'s plain values (step counts, CFG scales, seed, output
modes), which need no file: importing this module is cheap (no torch, diffusers or megatron-core),
so the command refuses a bad value in one line before it imports what renders
(``adm_megatron.sampling``, which runs the same checks for its Python callers)."""

from __future__ import annotations

import math

SEED_END = 2**64  # torch.Generator.manual_seed takes seeds below it (and folds negative ones onto them)


def check_steps(flag: str, steps: int) -> None:
    """One-line ValueError for a step count below 1 (``flag``: the option that gave it)."""
    if steps < 1:
        raise ValueError(f"{flag} {steps}: expected >= 1")


def check_guidance(flag: str, scale: float) -> None:
    """One-line ValueError for a CFG scale the pipelines cannot take (below 1, infinite or NaN)."""
    if not scale >= 1 or math.isinf(scale):  # NaN fails the comparison too
        raise ValueError(f"{flag} {scale}: expected a finite number >= 1 (1: no CFG; the pipeline applies CFG "
                         "above 1 only)")


def check_seed(seed: int, samples: int) -> None:
    """One-line ValueError unless every one of ``samples`` seeds (``seed`` + i) is one torch takes."""
    if not 0 <= seed <= SEED_END - samples:  # a negative seed would repeat another's noise
        raise ValueError(f"--seed {seed}: expected 0 to {SEED_END - samples} (sample i is seeded with --seed + i, "
                         "and torch.Generator.manual_seed takes 0 to 2**64 - 1)")


def check_prompts(samples: int) -> None:
    if not samples:
        raise ValueError("--prompt / --prompt-file: give at least one prompt")


def check_out_modes(overwrite: bool, resume: bool) -> None:
    if overwrite and resume:
        raise ValueError("--overwrite with --resume: give one (--overwrite replaces --out, --resume finishes it)")


def check_sample_options(args, samples: int) -> None:
    """The command line's values (``args``: the parsed ``sample`` options; ``samples``: the prompts
    times ``--samples-per-prompt``), each refused in one line naming its option."""
    if args.steps is not None:
        check_steps("--steps", args.steps)
    check_guidance("--guidance-scale", args.guidance_scale)
    if args.teacher_steps < 0:
        raise ValueError(f"--teacher-steps {args.teacher_steps}: expected >= 1, or 0 for no teacher")
    if args.teacher_guidance_scale is not None:
        if not args.teacher_steps:  # it would be ignored without a word
            raise ValueError(f"--teacher-guidance-scale {args.teacher_guidance_scale} with --teacher-steps 0: there "
                             "is no teacher run to apply it to; drop one of them")
        check_guidance("--teacher-guidance-scale", args.teacher_guidance_scale)
    check_prompts(samples)
    check_seed(args.seed, samples)
    check_out_modes(args.overwrite, args.resume)
