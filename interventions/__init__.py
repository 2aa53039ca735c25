"""sae-circuits: intervention API on the SAE-spliced model (imports sae only)."""
