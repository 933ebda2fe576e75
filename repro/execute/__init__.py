"""Where and when runs execute: time estimates, budgeted campaigns, archives of results, bundles for bare GPU boxes."""
