"""Attention-output sparse autoencoders on hook_z, trained with SAELens. Importing this package
imports every module in it, and each module registers its methods with `workbench.methods`."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
