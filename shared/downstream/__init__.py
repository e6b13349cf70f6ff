"""fedst shared/downstream."""
