"""Answers from a trained model outside the Trainer: the batched predictor, chat sessions, rank-ordered gathering."""
