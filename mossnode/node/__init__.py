"""The daemon's I/O: libp2p host, gossip, streams, timers, storage; thin glue over protocols/."""
