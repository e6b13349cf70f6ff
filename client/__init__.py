"""fedst client."""
