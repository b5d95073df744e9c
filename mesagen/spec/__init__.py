"""mesagen.spec."""
