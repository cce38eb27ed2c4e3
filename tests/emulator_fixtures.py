"""Emulator fixtures (filled in by the emulator's own work)."""
