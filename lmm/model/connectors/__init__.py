"""Connector implementations, one family per module; ``lmm.model.connector`` registers them."""
