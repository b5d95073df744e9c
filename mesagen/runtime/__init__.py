"""mesagen.runtime."""
