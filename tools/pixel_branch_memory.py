"""Measured memory of ADP's pixel branch (``heads/pixel.py``): the pipeline's VAE decode and the vision
encoder, each run with grad to its input as the generator phase runs them, with and without
``distill.pixel_recompute``; printed as a table and written as JSON.

    python tools/pixel_branch_memory.py --out docs/bench/pixel_branch_memory.json
    python tools/pixel_branch_memory.py --autocast bf16 --out docs/bench/pixel_branch_memory_bf16.json

What is measured (torch.profiler's allocator events: ``memory/measure.peak_during``): the peak
tensor bytes above the start of one forward + backward of the frozen module (its input requires
grad, its weights do not) at the published architectures with random weights, in fp32 or, with
``--autocast bf16``, under BF16 autocast with fp32 weights -- how ``model.dtype=bf16`` runs it (the
phase's loss runs inside megatron's autocast context); on a CPU that is the CPU autocast's op lists,
on a GPU (``--device cuda``) CUDA's:

- the VAE decoders of CogVideoX (``AutoencoderKLCogVideoX``) and SD3 / SD3.5 (``AutoencoderKL``) at a
  small probe size, divided by the output pixels: convolutions keep per pixel what they keep, so
  bytes per output pixel carry to the real size (the extrapolation; the SD3 decoder's one
  attention block, at 1/8 resolution, is the exception the figure does not cover);
- the encoders (SAM ViT-B, DINOv2-B) on one image at their own input size (frames are resized to
  it, whatever the video's size), with four tapped layers, per image.

The run's sizes: CogVideoX 13 x 60 x 90 latents = 49 frames of 480 x 720 (every frame goes
through the encoder); SD3 128 x 128 latents = one 1024 x 1024 image.

Beside each measurement the JSON has ``counted_peak_bytes``: the same run on fake tensors under
``adm_megatron.memory.fake_peak.FakePeak``, the count the memory planner makes of the branch
(``adm_megatron/memory/pixel_branch.py``), on the same device type and autocast (on a GPU: CUDA fake
tensors and CUDA's autocast op lists). ``tests/test_fake_peak.py`` holds the count to within 15% of
the committed measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from typing import Callable

import torch

# the published configs (vae/config.json of THUDM/CogVideoX-2b and of stabilityai's SD3 pipelines;
# the vision config of facebook/sam-vit-base, the config of facebook/dinov2-base)
COGVIDEOX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["CogVideoXDownBlock3D"] * 4,
    up_block_types=["CogVideoXUpBlock3D"] * 4, block_out_channels=[128, 256, 256, 512], latent_channels=16,
    layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32, temporal_compression_ratio=4,
    sample_height=480, sample_width=720, scaling_factor=1.15258426, use_quant_conv=False, use_post_quant_conv=False,
)
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=16,
    norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)
SAM_VIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=1024, patch_size=16,
                 mlp_dim=3072, output_channels=256, window_size=14, global_attn_indexes=[2, 5, 8, 11])
DINOV2_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=518, patch_size=14)
LAYERS = [3, 6, 9, 12]  # distill.pixel_layers' default
# a real run's output pixels per sample (CogVideoX: 13 x 60 x 90 latents; SD3: 128 x 128) and images
RUN_PIXELS = {"cogvideox": 49 * 480 * 720, "sd3": 1024 * 1024}
RUN_IMAGES = {"cogvideox": 49, "sd3": 1}


def _vae(name: str, device: str):
    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX

    torch.manual_seed(0)
    with torch.device(device):  # built there (on fake tensors too, where .to() cannot move them)
        vae = AutoencoderKLCogVideoX(**COGVIDEOX_VAE) if name == "cogvideox" else AutoencoderKL(**SD3_VAE)
    return vae.eval().requires_grad_(False)


def _encoder(name: str, image_size: int | None, device: str, fake: bool):
    from transformers import Dinov2Config, Dinov2Model, SamVisionConfig, SamVisionModel

    from adm_megatron.memory.pixel_branch import no_init_weights

    torch.manual_seed(0)
    sizes = {} if image_size is None else {"image_size": image_size}
    # fake tensors: skip the initialisers (DINOv2's read values)
    with torch.device(device), (no_init_weights() if fake else contextlib.nullcontext()):
        if name == "sam":
            model = SamVisionModel(SamVisionConfig(**{**SAM_VIT_B, **sizes}))
        else:
            model = Dinov2Model(Dinov2Config(**{**DINOV2_B, **sizes}))
    return model.eval().requires_grad_(False)


def peak_of(run_on: Callable[[bool], Callable[[], None]], counted: bool) -> int:
    """The peak of ``run_on(fake)()``: measured by the profiler on real tensors, or counted on fake
    ones (``counted``: what the planner does)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from adm_megatron.memory.fake_peak import FakePeak
    from adm_megatron.memory.measure import peak_during

    if not counted:
        return peak_during(run_on(False))
    with FakeTensorMode():
        run = run_on(True)
        with FakePeak() as fake:
            run()
    return fake.peak


def _autocast(device: str, autocast: str):
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast == "bf16")


def vae_run(name: str, probe: tuple, recompute: bool, device: str, autocast: str, fake: bool, out: dict):
    """One decode + backward of the published VAE ``name`` at ``probe`` latents (its output pixels go
    to ``out``)."""
    from adm_megatron.families import get_family
    from adm_megatron.heads.pixel import recompute_vae

    vae = _vae(name, device)
    if recompute:
        recompute_vae(vae)
    family = get_family(name)
    with torch.device(device):
        latents = torch.randn(1, *probe).requires_grad_(True)

    def run():
        with _autocast(device, autocast):
            images = family.decode_images(vae, latents)
            loss = images.float().square().sum()
        out["pixels"] = images.shape[0] * images.shape[2] * images.shape[3]
        loss.backward()

    return run


def encoder_run(name: str, recompute: bool, image_size: int | None, device: str, autocast: str, fake: bool,
                out: dict):
    """One forward (hidden states at LAYERS) + backward of the published encoder ``name`` on one image."""
    from adm_megatron.heads.pixel import recompute_encoder

    encoder = _encoder(name, image_size, device, fake)
    if recompute:
        recompute_encoder(encoder)
    out["image_size"] = size = encoder.config.image_size
    with torch.device(device):
        pixels = torch.randn(1, 3, size, size).requires_grad_(True)

    def run():
        with _autocast(device, autocast):
            hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
            loss = sum(hidden[k].float().square().sum() for k in LAYERS)
        loss.backward()

    return run


def measure_vae(name: str, probe: tuple, recompute: bool, device: str = "cpu", autocast: str = "none") -> dict:
    out = {}
    start = time.perf_counter()
    peak = peak_of(lambda fake: vae_run(name, probe, recompute, device, autocast, fake, out), counted=False)
    seconds = time.perf_counter() - start
    counted = peak_of(lambda fake: vae_run(name, probe, recompute, device, autocast, fake, {}), counted=True)
    return {"component": f"{name} VAE decode", "recompute": recompute, "probe_latents": list(probe),
            "probe_pixels": out["pixels"], "peak_bytes": peak, "bytes_per_pixel": peak / out["pixels"],
            "run_bytes": peak / out["pixels"] * RUN_PIXELS[name], "run": name, "unit": "output pixel",
            "seconds": seconds, "counted_peak_bytes": counted}


def measure_encoder(name: str, recompute: bool, image_size: int | None, device: str = "cpu",
                    autocast: str = "none") -> dict:
    out = {}
    start = time.perf_counter()
    peak = peak_of(lambda fake: encoder_run(name, recompute, image_size, device, autocast, fake, out), counted=False)
    seconds = time.perf_counter() - start
    counted = peak_of(lambda fake: encoder_run(name, recompute, image_size, device, autocast, fake, {}), counted=True)
    return {"component": f"{name} encoder", "recompute": recompute, "image_size": out["image_size"],
            "peak_bytes": peak, "bytes_per_image": peak, "unit": "image", "seconds": seconds,
            "run_bytes_per_family": {f: peak * RUN_IMAGES[f] for f in RUN_IMAGES}, "counted_peak_bytes": counted}


def _table(rows: list[dict], mode: str) -> str:
    lines = [f"| component | recompute | probe | measured peak | per unit ({mode}) | CogVideoX run (49 x 480 x 720) | "
             "SD3 run (1024^2) | planner's count / measured |", "|---|---|---|---|---|---|---|---|"]
    gib = 1024**3
    for r in rows:
        if r["unit"] == "output pixel":
            probe = "x".join(map(str, r["probe_latents"])) + f" latents ({r['probe_pixels']} px)"
            per = f"{r['bytes_per_pixel'] / 1024:.1f} KiB / px"
            run = f"{r['run_bytes'] / gib:.1f} GiB"
            cells = [run, "-"] if r["run"] == "cogvideox" else ["-", run]
        else:
            probe = f"1 image of {r['image_size']}^2"
            per = f"{r['bytes_per_image'] / gib:.2f} GiB / image"
            cells = [f"{r['run_bytes_per_family'][f] / gib:.1f} GiB" for f in ("cogvideox", "sd3")]
        lines.append(f"| {r['component']} | {'yes' if r['recompute'] else 'no'} | {probe} | "
                     f"{r['peak_bytes'] / 2**20:.0f} MiB | {per} | {cells[0]} | {cells[1]} | "
                     f"{r['counted_peak_bytes'] / r['peak_bytes']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON to write (an existing one only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (earlier measurements)")
    parser.add_argument("--cogvideox-probe", default="3x16x16",
                        help="latent frames x height x width of the CogVideoX VAE probe (default 3x16x16)")
    parser.add_argument("--sd3-probe", default="32x32", help="latent height x width of the SD3 VAE probe")
    parser.add_argument("--encoders", default="sam,dinov2", help="comma-separated: sam, dinov2 (or empty)")
    parser.add_argument("--encoder-image-size", type=int, default=None,
                        help="override the encoders' input size (a quicker, smaller probe; default: theirs)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--autocast", default="none", choices=("none", "bf16"),
                        help="none: fp32; bf16: BF16 autocast, fp32 weights (as model.dtype=bf16 runs the branch)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:  # before minutes of measuring
        parser.error(f"--out {args.out}: exists (earlier measurements; pass --overwrite to replace them)")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device={args.device!r}: expected cpu, or cuda where CUDA is available")
    try:
        frames, h, w = (int(v) for v in args.cogvideox_probe.split("x"))
        sd3_h, sd3_w = (int(v) for v in args.sd3_probe.split("x"))
    except ValueError:
        parser.error(f"--cogvideox-probe={args.cogvideox_probe!r} / --sd3-probe={args.sd3_probe!r}: expected "
                     "FxHxW and HxW, e.g. 3x16x16 and 32x32")
    encoders = [e for e in args.encoders.split(",") if e]
    if set(encoders) - {"sam", "dinov2"}:
        parser.error(f"--encoders={args.encoders!r}: expected names among sam, dinov2")
    rows = []
    for recompute in (False, True):
        on = dict(device=args.device, autocast=args.autocast)
        rows.append(measure_vae("cogvideox", (frames, 16, h, w), recompute, **on))
        rows.append(measure_vae("sd3", (16, sd3_h, sd3_w), recompute, **on))
        rows += [measure_encoder(name, recompute, args.encoder_image_size, **on) for name in encoders]
    rows.sort(key=lambda r: (r["component"], r["recompute"]))
    mode = "fp32" if args.autocast == "none" else "bf16 autocast"
    print(_table(rows, mode))
    import diffusers
    import transformers

    from adm_megatron.json_file import write_json_atomically

    record = {"rows": rows, "command": " ".join(["python tools/pixel_branch_memory.py", *argv]),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else
              platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "transformers": transformers.__version__, "mode": mode, "date": time.strftime("%Y-%m-%d")}
    write_json_atomically(args.out, record, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
