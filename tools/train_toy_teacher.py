"""Train the toy study's teacher: a small CogVideoX transformer on the synthetic class-conditional
video latents (``adm_megatron.toy.data``), v-prediction on the CogVideoX-2b schedule.

    OMP_NUM_THREADS=1 python tools/train_toy_teacher.py --out assets/toy_teacher

The text condition is one fixed embedding per class (``prompts/``, text-embedding shards); with
probability ``--cond-dropout`` a row's condition is replaced by the negative (all-zero) embedding,
so classifier-free guidance works. Fresh data every step (the distribution is known), AdamW with a
linear warm-up and a cosine decay, an EMA of the weights (the EMA is what is saved). Everything is
seeded; the output directory is a diffusers pipeline directory the trainer takes as
``model.teacher`` (see ``adm_megatron/toy/pipeline.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from adm_megatron.toy import pipeline as toy_pipeline  # noqa: E402
from adm_megatron.toy.data import NUM_CLASSES, class_embeddings, sample_latents  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output pipeline directory")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--cond-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    schedule = toy_pipeline.schedule()
    model = toy_pipeline.build_transformer(seed=args.seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    embeddings, negative = class_embeddings(toy_pipeline.TEXT_LEN, toy_pipeline.TEXT_DIM, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    g = torch.Generator().manual_seed(args.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"toy teacher: {n_params} parameters, {args.steps} steps of batch {args.batch_size}", flush=True)
    start, cpu_start, running = time.time(), time.process_time(), 0.0
    for step in range(args.steps):
        labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g)
        x0 = sample_latents(labels, g)
        text = embeddings[labels].clone()
        drop = torch.rand(args.batch_size, generator=g) < args.cond_dropout
        text[drop] = negative
        t = torch.randint(0, schedule.num_train_timesteps, (args.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, noise, t)
        pred = model(hidden_states=x_t, encoder_hidden_states=text, timestep=t).sample
        loss = torch.nn.functional.mse_loss(pred, schedule.target(x0, noise, t))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1}: loss {running / args.log_every:.4f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
            running = 0.0
    seconds = time.time() - start
    info = {
        "command": "OMP_NUM_THREADS=%d python tools/train_toy_teacher.py %s" % (
            args.threads, " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))),
        "args": vars(args),
        "parameters": n_params,
        "train_seconds": round(seconds, 1),  # wall clock (the machine may be shared)
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "torch": torch.__version__,
    }
    toy_pipeline.save_pipeline(args.out, ema, info)
    toy_pipeline.save_prompts(os.path.join(args.out, "prompts"), embeddings, negative)
    print(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
