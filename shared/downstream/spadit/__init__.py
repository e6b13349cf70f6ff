"""SpaDiT: imputing unmeasured spatial genes from a scRNA-seq reference with a diffusion transformer.

Each gene is one sample (its vector over the ST spots, conditioned on its vector over the reference cells);
held-out genes are sampled from pure noise. Modules, top-down:
``loaders`` (CSV / h5ad inputs) -> ``data`` (pairing by name, normalisation, splits) -> ``model`` (the DiT)
-> ``train`` (DDPM training, sampling) ; ``baseline`` (kNN cell->spot mapping) ; ``pipeline`` (both methods
on one split, with metrics) ; ``plots``.
Nothing heavy is imported here: import the submodule you need.
"""
