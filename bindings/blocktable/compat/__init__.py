"""Adapters that give blocktable other engines' signatures (vllm: vLLM v1's
worker BlockTable)."""
