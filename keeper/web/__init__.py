"""The web console: noVNC and RFB over WebSocket (RFC 6455) on Domain R's address."""
