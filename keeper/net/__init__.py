"""Kernel-facing network pieces of Domain R: TCP repair and TCP_INFO."""
