"""summon: an HTTP front proxy that summons single-purpose VMs on request."""

__version__ = "0.1.0"
