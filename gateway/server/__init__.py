"""The HTTP edge: the connection protocol (slow clients, malformed requests) and response hygiene."""
