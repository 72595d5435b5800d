"""Models the project trains for itself: the English corpus, the bundled qwen3moe model."""
