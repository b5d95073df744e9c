"""mesagen.ir."""
