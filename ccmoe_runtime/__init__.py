"""ccmoe-runtime: deploy pre-pruned Mixture-of-Experts models on small machines with llama.cpp."""

__version__ = "0.1.0"
