"""mesagen.backends."""
