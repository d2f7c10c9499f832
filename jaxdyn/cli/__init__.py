"""Command lines: argument parsing only; each `main(argv)` calls the library."""
