"""Training: the LightningModule, the LightningCLI, parallel strategies, and the callbacks
(progress, non-finite guard, fault-tolerant checkpoints) plus the random state saved with
checkpoints.
"""
