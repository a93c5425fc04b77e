"""Converters from public formats (LLaVA-1.5, ShareGPT4V, any LLaVA-schema file) to WebDataset
shards, and the synthetic shapes world generator. CLIs: ``python -m data_prep.llava``,
``python -m data_prep.sharegpt4v``, ``python -m data_prep.shapes_world``."""
