"""The scheduler daemon: a gateway whose transport is the clock (see README.md)."""
