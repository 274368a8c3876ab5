"""Circuit discovery over the edge graph (EAP, EAP-IG, ACDC, node-derived and discrete-SAE rankings), and running circuits to score them (faithfulness, comparison with a reference)."""
