"""Example providers: copy one and adapt it; see example_provider.py."""
