"""Circuit-analysis methods; importing this package registers them with `workbench.methods`."""

from circuits import attribution, baseline, patching_methods  # noqa: F401
