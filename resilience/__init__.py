"""Fault-injection campaigns: bit flips, fault sites, engines, metrics and reports."""
