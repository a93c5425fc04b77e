"""Synthetic data worlds: small, exactly-known image/text data generated on the spot for the tiny
pipeline and the tests.
"""
