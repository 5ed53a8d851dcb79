"""Redis: the auto-pipelining client, every key format, and the two cache tiers."""
