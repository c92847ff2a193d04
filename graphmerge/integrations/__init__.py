"""Adapters that run graphmerge's gate phase inside other libraries' training loops."""
