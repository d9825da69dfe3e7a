"""discovery: see README.md."""
