"""HTTP/WebSocket gateway: uvicorn serving a bridge between browsers and the channel layer."""
