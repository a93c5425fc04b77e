"""Checkpoints on disk: atomic writes, safetensors weight files, Lightning checkpoint I/O, self-
contained checkpoint directories, Hugging Face formats. No command code (see lmm.commands).
"""
