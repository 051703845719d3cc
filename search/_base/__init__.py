"""What every layer shares: the plain records, the vocabularies, errors and small helpers.

Nothing here imports torch, Ray or MLflow at import time (``attrs`` imports Optuna).
"""
