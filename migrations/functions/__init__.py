"""Stored functions, one a file, re-applied whenever a file's content changes."""
