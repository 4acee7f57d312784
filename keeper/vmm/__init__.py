"""The simulated hypervisor a host agent owns: domains, memory, grants, event channels,
XenStore, log-dirty. Everything on the network side is real; this part is simulated
on purpose (DESIGN.md §2), with Xen's semantics."""
