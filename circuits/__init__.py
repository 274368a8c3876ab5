"""Circuit-analysis methods; importing this package registers them with `workbench.methods`."""

from circuits import (  # noqa: F401
    attribution, attribution_patching, baseline, heads, patching_methods, path_patching, patterns, retrieval,
)
