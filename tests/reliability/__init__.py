"""Reliability: broken plugins, faults halfway through prepare, bad inputs, random models, threads."""
