"""The workflow's core: the configuration and its checks, and the command line that every rule calls."""
