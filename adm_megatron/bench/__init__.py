"""Throughput measurement (``adm-megatron bench``): analytic FLOPs, network-evaluation counting,
timing, the DiT against diffusers, and the ADM iteration through the real trainer."""
