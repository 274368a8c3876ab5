"""Per-head scores: detectors, sinks and ablations, logit attribution, retrieval heads, stored patterns."""
