"""A stand-in for "your package" in the documentation's snippets (tests/snippets/README.md)."""
