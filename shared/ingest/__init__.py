"""fedst shared/ingest."""
