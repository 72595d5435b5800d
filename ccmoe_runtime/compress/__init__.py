"""Compression: measure a model (imatrix, expert usage, per-type error, output impact), plan a type per tensor
for a device, and build the GGUF with llama-quantize."""
