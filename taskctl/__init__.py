"""taskctl: a task platform for the shell. This package holds the CLI, its client and the wire contract."""

__version__ = "0.1.0"
API_VERSION = "v1"
DEFAULT_QUEUE = "default"  # always there (a migration makes it); others come from `queue set`
