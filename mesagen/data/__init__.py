"""mesagen.data."""
