"""Serving what the recipes trained: one engine (serving/engine.py: continuous batching, streaming, the prompt
each recipe trained on) behind an OpenAI-compatible API (`python -m serving.api`), the recipes' CLIs and the web demo.
"""
