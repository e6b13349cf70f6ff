"""fedst server."""
