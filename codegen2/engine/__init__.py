"""Generation: sampling parameters, the static KV cache and (later) the batched engine."""
