"""The embedded default: generated dataset, trained tokenizers and tiny models, all local."""
