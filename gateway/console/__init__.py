"""The operator's web console at /ui: static ES modules, a client of the control-plane API."""
