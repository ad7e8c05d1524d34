"""Data sets the project loads from where users already have them (never downloaded)."""
