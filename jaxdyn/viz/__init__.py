"""Pictures of a run: the metrics dashboard (`dashboard`, from metrics.jsonl) and the routing
picture of a MoD / DTF model (`routing`, a figure and its plain-text twin).
`python -m jaxdyn.viz --workdir DIR` draws both (jaxdyn/cli/viz.py)."""
