"""Keys, peer ids and signed envelopes. Pure: no I/O beyond explicit key-file helpers, no clock."""
