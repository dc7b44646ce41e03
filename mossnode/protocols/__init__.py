"""Sans-IO state machines: no sockets, files or clock. Inputs are arguments, effects are values."""
