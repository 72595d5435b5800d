"""What a model is: GGUF inventories (read), generated models (write), tokenizers, expert-usage artifacts, and
model specs (paths, shards, hf:, inventories, Hugging Face folders converted with llama.cpp's script)."""
