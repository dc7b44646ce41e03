"""Local agent backends: where the work a node wins actually runs."""
