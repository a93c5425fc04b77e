"""Tiny random-init stand-ins of real architectures (towers, LLM families), written with
``save_pretrained`` and a locally built tokenizer, so tests and CPU runs load them through
the same ``from_pretrained`` path a hub name takes. Nothing is downloaded."""
