"""Data pipeline: jsonl -> examples -> tokenised (cached) -> alignment (cached) -> padded batches."""
