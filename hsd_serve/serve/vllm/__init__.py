"""The target on vLLM (``target_executor: vllm``): see docs/vllm.md.  Only ``executor`` imports
vLLM (lazily); the rest runs without it."""
