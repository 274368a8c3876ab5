"""Circuit-analysis methods. Importing this package imports every module in it and in its
subpackages (`patching`, `discovery`, `heads`), and each module registers its methods with
`workbench.methods`: a new method is a new file here and nothing else."""

import importlib
import pkgutil

for _module in pkgutil.walk_packages(__path__, f"{__name__}."):
    importlib.import_module(_module.name)
