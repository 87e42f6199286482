"""Generation-based evaluation (ROUGE-L) and results tables."""
