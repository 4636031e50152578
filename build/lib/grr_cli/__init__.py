"""The `grr` command line: parses, calls library functions, prints."""
