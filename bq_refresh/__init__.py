"""Foundations shared by every layer of bq-refresh: settings, errors, local services."""
