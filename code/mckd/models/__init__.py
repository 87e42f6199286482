"""Model and tokenizer loading, per-family access to embeddings and output heads, projectors."""
