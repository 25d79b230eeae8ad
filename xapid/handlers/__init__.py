"""xapi's HTTP handlers beside the RPC endpoint (issue 14)."""
