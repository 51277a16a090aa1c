"""Applications over the OpticalMemory API: the command line (and, later, the server and workers)."""
