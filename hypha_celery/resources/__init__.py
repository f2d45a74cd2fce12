"""What a node has and lends: requirements, the lease ledger, placement, capabilities, GPUs."""
