"""Models: loading and tuned recipes, sites and the hook API, tokenisation, CPU kernels, tiny test models."""
