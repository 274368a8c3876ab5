"""Circuit-analysis methods; importing this package registers them with `workbench.methods`."""

from circuits import attribution, baseline  # noqa: F401
