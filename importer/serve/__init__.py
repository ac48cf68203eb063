"""Servers that receive images: CDI's upload server (upload_server.py) and its HTTP body readers."""
