"""order: orders as the client sees them and stream sessions."""
