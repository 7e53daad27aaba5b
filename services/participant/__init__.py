"""The participant service."""
