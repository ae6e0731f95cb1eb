"""The Slack gateway: one Slack app (Socket Mode or the Events API) on a channel layer (see README.md)."""
