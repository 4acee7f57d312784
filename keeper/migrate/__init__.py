"""Migration managers (MM_R: Domain R; MM_U: Domain U) and the coordinator."""
