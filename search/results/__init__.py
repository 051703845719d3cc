"""What a study leaves: trial tables and the Pareto front, plots, files, and MLflow runs."""
