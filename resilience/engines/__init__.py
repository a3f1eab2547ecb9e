"""Interchangeable injection engines behind :class:`resilience.engines.base.Engine`."""
