"""TCP tunnels between devices over the peer session (docs/tunnels.md): the exposing side's
allow-list, the pipe between a TCP connection and its TUNNEL stream, and forwards."""
