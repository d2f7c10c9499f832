"""Pictures of a run: the metrics dashboard and the routing picture."""
