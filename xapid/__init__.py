"""xapid: a XenAPI (xapi) emulator daemon centred on HA with pluggable cluster stacks."""

__version__ = "0.1.0"
