"""Attention-output sparse autoencoders (hook_z, trained with SAELens); see the SAE issue."""
