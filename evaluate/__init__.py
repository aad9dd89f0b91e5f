"""Survival and grade heads, and report metrics, from the cache alone: never imports the encoder."""
