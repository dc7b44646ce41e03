"""Small exec agents shipped for the demo and for trying mossnode without an LLM."""
