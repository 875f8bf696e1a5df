"""Constructed prompt-forgetting tasks, tokenizers and DataModules."""
