"""Layouts from Xen's public headers (`xen/include/public/io/*.h`), as sans-I/O code.

The shared pages between Domain U and Domain R are laid out exactly as Xen lays them
out, so the simulation can be checked against the spec rather than against itself.
"""
