"""The lab: a switch, hosts and a client as Linux network namespaces (pyroute2, no `ip`)."""
