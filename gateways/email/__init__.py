"""The email gateway: an SMTP server whose mail becomes ``email.receive``, and ``email.send``."""
