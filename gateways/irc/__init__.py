"""The IRC gateway: an IRC identity on a channel layer (see README.md)."""
