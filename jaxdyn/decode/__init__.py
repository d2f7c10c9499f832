"""Plain KV-cached generation and token sampling, shared by every decoder."""
