"""The upstream client: one lean HTTP/1.1 client for provider calls."""
