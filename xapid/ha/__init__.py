"""High availability: xhad.conf, liveset parsing and the cluster-stack script runner."""
