"""Circuit-analysis methods; importing this package registers them with `workbench.methods`."""

from circuits import attribution, attribution_patching, baseline, heads, patching_methods, path_patching, retrieval  # noqa: F401
