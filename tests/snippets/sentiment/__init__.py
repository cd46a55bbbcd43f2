"""Stand-in package for the docs' snippets (docs/howto/namespace.md): a tiny "model"."""
