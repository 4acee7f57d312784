"""The raw TCP console service of Domain R (sans-I/O session core)."""
