"""Test support shipped with the package (fault injection). Nothing here runs unless a test arms it."""
