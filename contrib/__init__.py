"""Deployment and example files for distributedtask (not part of the installed package)."""
