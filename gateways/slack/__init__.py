"""The Slack gateway: one Slack app (Socket Mode or Events API) on a layer (see README.md)."""
