"""The local API: HTTP/1.1 + JSON on a Unix socket, for the CLI and the host's agents."""
