"""Evaluation: judges, win rates with length control, ROUGE, over-optimization, CNN/DM transfer, the report."""
