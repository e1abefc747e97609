"""A toy, CPU-sized distillation study with a known data distribution (docs/toy_study.md).

``data``: the class-conditional moving-pattern latents; ``metrics``: fixed feature space, Fréchet
distance, classifier, diversity; ``pipeline``: the teacher's diffusers directory and class
embeddings; ``sampling``: N-step PF-ODE sampling of diffusers transformers; ``render``: PNG grids.
"""
