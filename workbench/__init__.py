"""Workbench: a mechanistic-interpretability workbench for attention heads and circuits.

The core: models, tasks, metrics, the Result type, the store, jobs and the CLI.
"""

__version__ = "0.1.0"
