"""Running compressed models: decoding with a static KV cache, generation, chat, and the inference-side caches."""
