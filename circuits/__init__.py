"""Circuit-analysis methods; importing this package registers them with `workbench.methods`."""

from circuits import attribution, attribution_patching, baseline, patching_methods, path_patching  # noqa: F401
