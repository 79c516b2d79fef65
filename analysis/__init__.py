"""Looking at results after a run: per-query ranks files (``query_ranks``), query-by-query comparison of two
runs (``python -m analysis.compare_runs``) and the metrics of a saved similarity matrix
(``python -m analysis.evaluate_sim_matrix``)."""
