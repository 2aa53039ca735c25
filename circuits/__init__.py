"""sae-circuits: attribution circuits (imports interventions and sae)."""
