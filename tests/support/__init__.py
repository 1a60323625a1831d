"""Helpers shared by the test modules (imported as `support.<module>`; pytest puts tests/ on the path)."""
