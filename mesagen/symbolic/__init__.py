"""mesagen.symbolic."""
