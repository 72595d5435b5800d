"""Expert pruning by router statistics (importance, frequency or random), with activation adjustment."""
