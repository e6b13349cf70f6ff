"""fedst shared/c2l."""
