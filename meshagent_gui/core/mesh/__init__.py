"""Control-plane client: REST, WebSocket and the wire types shared with the reference server."""
