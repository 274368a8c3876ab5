"""Circuit-analysis methods; importing this package registers them with `workbench.methods`."""

from circuits import baseline  # noqa: F401
