"""Attention-output sparse autoencoders on hook_z, trained with SAELens; importing this package
registers their methods with `workbench.methods`."""

from sae import prompt_features, saes, training  # noqa: F401
