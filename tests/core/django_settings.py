"""Minimal Django settings for the `django[:ALIAS]` layer path tests."""

SECRET_KEY = "test"
INSTALLED_APPS = ["channels"]
USE_TZ = True
CHANNEL_LAYERS = {
    "default": {"BACKEND": "channels.layers.InMemoryChannelLayer"},
    "other": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 3}},
}
