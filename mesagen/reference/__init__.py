"""mesagen.reference."""
