"""Reports over many compression runs: the Pareto front of size against quality, a markdown table
(``pareto``) and a perplexity-versus-size plot (``plot``, matplotlib).

Pure functions of plain rows (dicts of numbers and labels): they never read the registry or run a
model, so the batch flow, a benchmark script or a notebook can all draw the same report.
"""
