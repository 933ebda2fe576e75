"""Run records, tables over them, and checks against the papers' references."""
